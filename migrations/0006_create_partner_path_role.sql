-- The partner path runs every transaction as apptgate_partner (SET LOCAL ROLE),
-- a role that can read only the basic-view columns, cannot touch contact
-- columns or the visit reason, and can add to the disclosure ledger only
-- through append_disclosures: it holds no UPDATE or DELETE on it.
-- Roles belong to the cluster, so creating one is guarded; the migrating user
-- (who also serves) becomes a member so it can switch to it.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'apptgate_partner') THEN
        CREATE ROLE apptgate_partner NOLOGIN NOINHERIT;
    END IF;
END
$$;
GRANT apptgate_partner TO CURRENT_USER;

GRANT USAGE ON SCHEMA public TO apptgate_partner;
GRANT SELECT (id, display_name, specialty) ON practitioners TO apptgate_partner;
GRANT SELECT (id, practitioner_id, patient_id, start_time, end_time, status, update_time) ON appointments
    TO apptgate_partner;
GRANT SELECT (id, partner_id, secret_hash, create_time, revoke_time) ON partner_keys TO apptgate_partner;
GRANT SELECT (partner_id, practitioner_id, revoke_time) ON practitioner_grants TO apptgate_partner;

-- Functions are executable by PUBLIC unless revoked.
REVOKE ALL ON FUNCTION append_disclosures(uuid, text, text, text, smallint, smallint, text, text[], uuid[], uuid[],
    smallint[], uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION read_consented_contact(uuid, uuid, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION append_disclosures(uuid, text, text, text, smallint, smallint, text, text[], uuid[], uuid[],
    smallint[], uuid) TO apptgate_partner;
GRANT EXECUTE ON FUNCTION read_consented_contact(uuid, uuid, uuid) TO apptgate_partner;
