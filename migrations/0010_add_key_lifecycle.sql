-- A partner key's lifecycle: an optional expire time, so that a key can be rotated with an
-- overlap (issue the new key, move the software to it, let the old one lapse) and lapse by
-- itself, and an index that answers when each key was last used from the ledger, which
-- already names the key of every record, instead of a write on every partner call.
--
-- Every partner function verifies a key through partner_of_key (directly, or through
-- partner_admit and partner_authenticate), so redefining it makes every one of them refuse an
-- expired key with AG401, exactly as an unknown or revoked one. Expiry is compared with the
-- statement's start, as each call's own statement sees it.
--
-- The index is built inside the migration's transaction, so records wait while it builds:
-- on a large ledger, migrate at a quiet hour.
--
-- Redefines partner_of_key: a key past its expire time verifies no more, like a revoked one.

ALTER TABLE partner_keys
    -- When the key stops verifying by itself; NULL for a key that lasts until revoked.
    ADD COLUMN expire_time timestamptz,
    ADD CONSTRAINT partner_keys_expire_check CHECK (expire_time IS NULL OR expire_time > create_time);

-- A key's latest record: the last use PartnerRegistryService.ListPartnerKeys reports, one
-- backward index probe per key.
CREATE INDEX disclosures_key_time_idx ON disclosures (key_id, disclose_time);

CREATE OR REPLACE FUNCTION partner_of_key(p_key_id text, p_credential bytea) RETURNS uuid
LANGUAGE sql STABLE
SET search_path = pg_catalog, public
AS $$
    SELECT k.partner_id FROM partner_keys k
    WHERE k.id = p_key_id AND k.secret_hash = substring(p_credential FROM 1 FOR 32) AND k.revoke_time IS NULL
      AND (k.expire_time IS NULL OR k.expire_time > statement_timestamp())
      AND length(p_credential) IN (32, 64)
      AND (k.client_cert_sha256 IS NULL OR k.client_cert_sha256 = substring(p_credential FROM 33))
$$;
REVOKE ALL ON FUNCTION partner_of_key(text, bytea) FROM PUBLIC;
