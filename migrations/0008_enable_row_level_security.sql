-- Row-level security on the partner path: even a wrong query run as
-- apptgate_partner sees only the rows of practitioners who granted the
-- calling partner access. The partner is bound per transaction with
-- set_config('apptgate.partner_id', <id>, true) (never SET with string
-- formatting); outside a transaction the setting reads as '' (not NULL), so
-- every policy goes through NULLIF and matches nothing when it is unset.
-- FORCE applies the policies to the table owner too; the owner's own path
-- (the internal listener, the feed hub, SECURITY DEFINER functions) is let
-- through by a policy naming every role except apptgate_partner.

CREATE FUNCTION current_partner_id() RETURNS uuid
LANGUAGE sql STABLE
SET search_path = pg_catalog
AS $$ SELECT NULLIF(current_setting('apptgate.partner_id', true), '')::uuid $$;

ALTER TABLE practitioner_grants ENABLE ROW LEVEL SECURITY;
ALTER TABLE practitioner_grants FORCE ROW LEVEL SECURITY;
CREATE POLICY practitioner_grants_owner_path ON practitioner_grants
    USING (current_user <> 'apptgate_partner') WITH CHECK (current_user <> 'apptgate_partner');
CREATE POLICY practitioner_grants_partner_path ON practitioner_grants FOR SELECT TO apptgate_partner
    USING (partner_id = current_partner_id());

ALTER TABLE appointments ENABLE ROW LEVEL SECURITY;
ALTER TABLE appointments FORCE ROW LEVEL SECURITY;
CREATE POLICY appointments_owner_path ON appointments
    USING (current_user <> 'apptgate_partner') WITH CHECK (current_user <> 'apptgate_partner');
CREATE POLICY appointments_partner_path ON appointments FOR SELECT TO apptgate_partner
    USING (practitioner_id IN (
        SELECT g.practitioner_id FROM practitioner_grants g
        WHERE g.partner_id = current_partner_id() AND g.revoke_time IS NULL));

ALTER TABLE appointment_changes ENABLE ROW LEVEL SECURITY;
ALTER TABLE appointment_changes FORCE ROW LEVEL SECURITY;
CREATE POLICY appointment_changes_owner_path ON appointment_changes
    USING (current_user <> 'apptgate_partner') WITH CHECK (current_user <> 'apptgate_partner');
CREATE POLICY appointment_changes_partner_path ON appointment_changes FOR SELECT TO apptgate_partner
    USING (practitioner_id IN (
        SELECT g.practitioner_id FROM practitioner_grants g
        WHERE g.partner_id = current_partner_id() AND g.revoke_time IS NULL));

GRANT EXECUTE ON FUNCTION current_partner_id() TO apptgate_partner;

-- The partner path should not even be able to switch back to the owner: when
-- it logs in as apptgate_partner (its own pool), session_user is that role and
-- SET ROLE cannot return to anything more privileged. LOGIN without a password
-- only works where the server trusts the connection (local development, CI);
-- elsewhere give the role a password or certificate and point
-- APPTGATE_PARTNER_DATABASE_URL at it.
ALTER ROLE apptgate_partner LOGIN;
