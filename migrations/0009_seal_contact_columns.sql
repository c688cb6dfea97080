-- Contact details and the visit reason encrypted at rest by the service
-- (service/sealing.py): each value sealed with AES-256-GCM under a data key the
-- database never sees, bound to its table, column and row, the key id stored in
-- the value. A dump of these tables, or a role that can read them, reveals no
-- contact value and no reason.
--
-- This is the EXPAND step of an expand/contract change (STYLE.md, Storage):
--   1. (here) add the sealed columns; the plaintext ones become nullable, and
--      the service writes only the sealed columns from now on;
--   2. every deployment runs `python -m service data-key reencrypt`, which seals
--      the values older versions left in clear and sets their plaintext to NULL
--      (`python -m service data-key status` then shows no plaintext left);
--   3. (CONTRACT, a later migration) drop the plaintext columns, their indexes,
--      and the clear-text fallback of read_consented_contact.

-- A sealed value: version (1 byte) | data key id (2 bytes) | nonce (12 bytes) |
-- AES-256-GCM ciphertext and tag; NULL where the plaintext column held NULL.
ALTER TABLE patients
    ADD COLUMN sealed_given_name  bytea,
    ADD COLUMN sealed_family_name bytea,
    ADD COLUMN sealed_phone       bytea,
    ADD COLUMN sealed_email       bytea,
    ALTER COLUMN given_name DROP NOT NULL,
    ALTER COLUMN family_name DROP NOT NULL;

ALTER TABLE appointments
    ADD COLUMN sealed_reason bytea,
    ALTER COLUMN reason DROP NOT NULL,
    ALTER COLUMN reason DROP DEFAULT;

COMMENT ON COLUMN patients.given_name IS
    'Plaintext left by versions before 0009; NULL once sealed. Dropped by a later migration once every deployment ran data-key reencrypt.';
COMMENT ON COLUMN patients.family_name IS
    'Plaintext left by versions before 0009; NULL once sealed. Dropped by a later migration once every deployment ran data-key reencrypt.';
COMMENT ON COLUMN patients.phone IS
    'Plaintext left by versions before 0009; NULL once sealed. Dropped by a later migration once every deployment ran data-key reencrypt.';
COMMENT ON COLUMN patients.email IS
    'Plaintext left by versions before 0009; NULL once sealed. Dropped by a later migration once every deployment ran data-key reencrypt.';
COMMENT ON COLUMN appointments.reason IS
    'Plaintext left by versions before 0009; NULL once sealed. Dropped by a later migration once every deployment ran data-key reencrypt.';

-- The rows the backfill still has to seal: empty once it ran, so checking that
-- nothing is left in clear (at every `serve` start) is one index probe.
CREATE INDEX patients_unsealed_idx ON patients (id)
    WHERE given_name IS NOT NULL OR family_name IS NOT NULL OR phone IS NOT NULL OR email IS NOT NULL;
CREATE INDEX appointments_unsealed_idx ON appointments (id) WHERE reason IS NOT NULL;

-- The header (version and key id) of each row's seal, so the key ids in use are
-- found by a few index probes rather than a scan. The service seals all of a
-- row's values at once under one key, so the column every row has stands for
-- its row; `data-key status` counts every column exactly.
CREATE INDEX patients_data_key_idx ON patients ((substring(sealed_family_name FROM 1 FOR 3)));
CREATE INDEX appointments_data_key_idx ON appointments ((substring(sealed_reason FROM 1 FOR 3)));

-- The consent-gated read now returns the sealed values of the fields a live
-- consent covers; the service opens them (the only decryption on the partner
-- path). Until the backfill ran, a field may still be held in clear: it is
-- returned in the trailing text columns, and a clear value wins (the service
-- never writes one; the backfill clears it as it seals). The return type
-- changes, so the function is dropped and created again, with its grants.
DROP FUNCTION read_consented_contact(uuid, uuid, uuid);

CREATE FUNCTION read_consented_contact(p_consent_id uuid, p_partner_id uuid, p_patient_id uuid)
RETURNS TABLE (
    state text, fields smallint[],
    sealed_given_name bytea, sealed_family_name bytea, sex smallint, sealed_phone bytea, sealed_email bytea,
    given_name text, family_name text, phone text, email text
)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
    c consents;
BEGIN
    SELECT * INTO c FROM consents WHERE id = p_consent_id;
    IF NOT FOUND OR c.partner_id <> p_partner_id OR c.patient_id <> p_patient_id THEN
        RETURN QUERY SELECT 'unknown'::text, '{}'::smallint[], NULL::bytea, NULL::bytea, NULL::smallint, NULL::bytea,
            NULL::bytea, NULL::text, NULL::text, NULL::text, NULL::text;
    ELSIF c.revoke_time IS NOT NULL THEN
        RETURN QUERY SELECT 'revoked'::text, c.fields, NULL::bytea, NULL::bytea, NULL::smallint, NULL::bytea,
            NULL::bytea, NULL::text, NULL::text, NULL::text, NULL::text;
    ELSIF c.expire_time <= statement_timestamp() THEN
        RETURN QUERY SELECT 'expired'::text, c.fields, NULL::bytea, NULL::bytea, NULL::smallint, NULL::bytea,
            NULL::bytea, NULL::text, NULL::text, NULL::text, NULL::text;
    ELSE
        RETURN QUERY
        SELECT 'live'::text, c.fields,
               CASE WHEN 1 = ANY (c.fields) THEN p.sealed_given_name END,
               CASE WHEN 1 = ANY (c.fields) THEN p.sealed_family_name END,
               CASE WHEN 2 = ANY (c.fields) THEN p.sex END,
               CASE WHEN 3 = ANY (c.fields) THEN p.sealed_phone END,
               CASE WHEN 4 = ANY (c.fields) THEN p.sealed_email END,
               CASE WHEN 1 = ANY (c.fields) THEN p.given_name END,
               CASE WHEN 1 = ANY (c.fields) THEN p.family_name END,
               CASE WHEN 3 = ANY (c.fields) THEN p.phone END,
               CASE WHEN 4 = ANY (c.fields) THEN p.email END
        FROM patients p WHERE p.id = p_patient_id;
    END IF;
END
$$;

-- Functions are executable by PUBLIC unless revoked.
REVOKE ALL ON FUNCTION read_consented_contact(uuid, uuid, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION read_consented_contact(uuid, uuid, uuid) TO apptgate_partner;
