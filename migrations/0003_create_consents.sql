-- Patients' consents to release some contact details to one partner.
--
-- The signed token is never stored (it is a bearer credential); its consent id is the key
-- of the one primary-key lookup that checks revocation on every use.

-- What a consent is worth at the moment it is presented.
CREATE TYPE consent_state AS ENUM ('live', 'revoked', 'expired', 'unknown');

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

-- A consent's state for this partner and patient and, when live, the values of the fields
-- it covers as stored (sealed, or in clear where an import left them and `data-key
-- reencrypt` has not sealed them yet). Called by the contact record statement (0005).
CREATE FUNCTION read_consented_contact(p_consent_id uuid, p_partner_id uuid, p_patient_id uuid)
RETURNS TABLE (
    state consent_state, fields smallint[],
    sealed_given_name bytea, sealed_family_name bytea, sealed_sex bytea, sealed_phone bytea, sealed_email bytea,
    given_name text, family_name text, sex smallint, phone text, email text
)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, public
AS $$
DECLARE
    c consents;
BEGIN
    SELECT * INTO c FROM consents WHERE id = p_consent_id;
    IF NOT FOUND OR c.partner_id <> p_partner_id OR c.patient_id <> p_patient_id THEN
        RETURN QUERY SELECT 'unknown'::consent_state, '{}'::smallint[], NULL::bytea, NULL::bytea, NULL::bytea,
            NULL::bytea, NULL::bytea, NULL::text, NULL::text, NULL::smallint, NULL::text, NULL::text;
    ELSIF c.revoke_time IS NOT NULL THEN
        RETURN QUERY SELECT 'revoked'::consent_state, c.fields, NULL::bytea, NULL::bytea, NULL::bytea,
            NULL::bytea, NULL::bytea, NULL::text, NULL::text, NULL::smallint, NULL::text, NULL::text;
    ELSIF c.expire_time <= statement_timestamp() THEN
        RETURN QUERY SELECT 'expired'::consent_state, c.fields, NULL::bytea, NULL::bytea, NULL::bytea,
            NULL::bytea, NULL::bytea, NULL::text, NULL::text, NULL::smallint, NULL::text, NULL::text;
    ELSE
        RETURN QUERY
        SELECT 'live'::consent_state, c.fields,
               CASE WHEN 1 = ANY (c.fields) THEN p.sealed_given_name END,
               CASE WHEN 1 = ANY (c.fields) THEN p.sealed_family_name END,
               CASE WHEN 2 = ANY (c.fields) THEN p.sealed_sex END,
               CASE WHEN 3 = ANY (c.fields) THEN p.sealed_phone END,
               CASE WHEN 4 = ANY (c.fields) THEN p.sealed_email END,
               CASE WHEN 1 = ANY (c.fields) THEN p.given_name END,
               CASE WHEN 1 = ANY (c.fields) THEN p.family_name END,
               CASE WHEN 2 = ANY (c.fields) THEN p.sex END,
               CASE WHEN 3 = ANY (c.fields) THEN p.phone END,
               CASE WHEN 4 = ANY (c.fields) THEN p.email END
        FROM patients p WHERE p.id = p_patient_id;
    END IF;
END
$$;
REVOKE ALL ON FUNCTION read_consented_contact(uuid, uuid, uuid) FROM PUBLIC;
