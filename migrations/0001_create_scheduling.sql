-- Scheduling: practitioners, patients and their appointments, the platform's own data.
--
-- Patients' names, sexes, phones and emails and appointments' visit reasons are sealed by the
-- gateway before they reach these tables (service/crypto/sealing.py): AES-256-GCM under a
-- data key the database never sees, each value bound to its table, column and row. A
-- sealed value is version (1 byte) | data key id (2 bytes) | nonce (12) | ciphertext and tag.
-- The partner path never selects a contact column or the reason (0007 grants it none).
-- data_key_checks holds a fingerprint of each data key, so a wrong key is refused at start.

CREATE TYPE appointment_status AS ENUM ('booked', 'cancelled');

CREATE TABLE practitioners (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    display_name text NOT NULL CHECK (length(display_name) BETWEEN 1 AND 200),
    specialty    text NOT NULL CHECK (length(specialty) BETWEEN 1 AND 200),
    create_time  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE patients (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- Contact details, sealed; released to a partner only under the patient's consent. The
    -- sex is sealed as the decimal text of its enum number, one digit, so that every sealed
    -- sex has the same length and the length tells nothing.
    sealed_given_name  bytea,
    sealed_family_name bytea,
    sealed_sex         bytea,
    sealed_phone       bytea,
    sealed_email       bytea,
    -- Contact details in clear, as an import of an existing platform's data loads them;
    -- `python -m service data-key reencrypt` seals each one and sets it NULL. The gateway
    -- never writes them.
    given_name         text,
    family_name        text,
    -- The appointments.type.v1.Sex enum number (0 = not recorded).
    sex                smallint CHECK (sex BETWEEN 0 AND 3),
    phone              text,
    email              text,
    create_time        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE appointments (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    practitioner_id uuid NOT NULL REFERENCES practitioners (id),
    patient_id      uuid NOT NULL REFERENCES patients (id),
    start_time      timestamptz NOT NULL,
    end_time        timestamptz NOT NULL,
    -- Health data, sealed: stored for the platform, never sent to partners.
    sealed_reason   bytea,
    -- The visit reason in clear, as an import loads it; sealed and cleared like the patients'.
    reason          text,
    status          appointment_status NOT NULL DEFAULT 'booked',
    create_time     timestamptz NOT NULL DEFAULT now(),
    update_time     timestamptz NOT NULL DEFAULT now(),
    CHECK (end_time > start_time)
);

-- The partner listing walks one practitioner's agenda in (start_time, id) order.
CREATE INDEX appointments_practitioner_start_idx ON appointments (practitioner_id, start_time, id);
CREATE INDEX appointments_patient_idx ON appointments (patient_id);

-- The rows `data-key reencrypt` still has to seal: empty once it ran, so the check at every
-- `serve` start that nothing is left in clear is one index probe.
CREATE INDEX patients_unsealed_idx ON patients (id)
    WHERE given_name IS NOT NULL OR family_name IS NOT NULL OR sex IS NOT NULL OR phone IS NOT NULL
       OR email IS NOT NULL;
CREATE INDEX appointments_unsealed_idx ON appointments (id) WHERE reason IS NOT NULL;

-- The seal header (version and data key id) of each row, so the key ids in use are found by
-- a few index probes rather than a scan. The gateway seals a row's values together under one
-- key, so the column every row has stands for its row; `data-key status` counts every column.
CREATE INDEX patients_data_key_idx ON patients ((substring(sealed_family_name FROM 1 FOR 3)));
CREATE INDEX appointments_data_key_idx ON appointments ((substring(sealed_reason FROM 1 FOR 3)));

-- The check value of each data key id: HMAC-SHA256(key, 'apptgate-data-key-check'), its first 16
-- bytes, a fingerprint that tells nothing of the key (service/crypto/sealing.py key_check). The
-- first `serve` or `data-key reencrypt` that uses an id records it (service/store/data_keys.py);
-- every start, `data-key status` and `data-key reencrypt` refuse a key whose check value differs,
-- so a wrong key under a known id is stopped before it seals anything. A retired key's row stays:
-- its id is never reused for another key.
CREATE TABLE data_key_checks (
    key_id      integer PRIMARY KEY CHECK (key_id BETWEEN 1 AND 65535),
    check_value bytea NOT NULL CHECK (length(check_value) = 16),
    record_time timestamptz NOT NULL DEFAULT now()
);
