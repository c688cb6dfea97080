-- Partners (third-party software), their keys, and practitioners' grants of access to them.

CREATE TABLE partners (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    display_name text NOT NULL UNIQUE CHECK (length(display_name) BETWEEN 1 AND 200),
    create_time  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE partner_keys (
    -- The public key id ("pk_…"), also the prefix of the bearer secret.
    id          text PRIMARY KEY,
    partner_id  uuid NOT NULL REFERENCES partners (id),
    -- SHA-256 of the whole bearer secret, never the secret: it is 256 random bits, so a
    -- fast hash is as strong as a slow one.
    secret_hash bytea NOT NULL CHECK (length(secret_hash) = 32),
    -- The SHA-256 of the DER client certificate the key is bound to (mutual TLS), or NULL:
    -- a bound key presented over a connection with another certificate, or none, does not
    -- verify, so a stolen key is of no use without the partner's private key.
    client_cert_sha256 bytea CHECK (length(client_cert_sha256) = 32),
    create_time timestamptz NOT NULL DEFAULT now(),
    revoke_time timestamptz
);
CREATE INDEX partner_keys_partner_idx ON partner_keys (partner_id);

-- One row per grant; a revoked grant keeps its row as history, and granting the same pair
-- again adds a row.
CREATE TABLE practitioner_grants (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    partner_id      uuid NOT NULL REFERENCES partners (id),
    practitioner_id uuid NOT NULL REFERENCES practitioners (id),
    grant_time      timestamptz NOT NULL DEFAULT now(),
    revoke_time     timestamptz,
    CHECK (revoke_time IS NULL OR revoke_time >= grant_time)
);
-- At most one active grant per pair; also the index of every access check.
CREATE UNIQUE INDEX practitioner_grants_active_idx
    ON practitioner_grants (partner_id, practitioner_id) WHERE revoke_time IS NULL;
