-- Patients' consents to release contact details to one partner. The signed
-- token is never stored (it is a bearer credential); its consent id is the
-- key of the one indexed lookup that checks revocation on every use.

CREATE TABLE consents (
    id             uuid PRIMARY KEY,
    patient_id     uuid NOT NULL REFERENCES patients (id),
    partner_id     uuid NOT NULL REFERENCES partners (id),
    -- appointments.type.v1.ContactField numbers, sorted and distinct.
    fields         smallint[] NOT NULL CHECK (cardinality(fields) BETWEEN 1 AND 4 AND fields <@ '{1,2,3,4}'),
    purpose        text NOT NULL CHECK (length(purpose) BETWEEN 1 AND 200),
    -- The PASERK id ("k4.pid.…") of the key that signed the token.
    signing_key_id text NOT NULL,
    create_time    timestamptz NOT NULL,
    expire_time    timestamptz NOT NULL,
    revoke_time    timestamptz,
    CHECK (expire_time > create_time)
);
CREATE INDEX consents_patient_idx ON consents (patient_id, create_time DESC);
