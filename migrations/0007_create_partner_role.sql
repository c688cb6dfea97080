-- The partner path's own role, apptgate_partner: what it may read and call, and the
-- row-level security that keeps it to the rows of practitioners who granted the calling
-- partner access.
--
-- Partner statements run as this role, logged in as it where the server allows (then its
-- session cannot switch back to the owner), else by SET LOCAL ROLE on the owner's pool.
-- Column privileges leave out every contact column and the visit reason; the ledger is
-- reachable only through append_disclosures. The partner is bound per transaction with
-- set_config('apptgate.partner_id', <id>, true) by partner_bind, after the key is checked.
-- Roles belong to the cluster, so creating it is guarded; the migrating user (who also
-- serves) becomes a member so that it can switch to it.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'apptgate_partner') THEN
        CREATE ROLE apptgate_partner NOLOGIN NOINHERIT;
    END IF;
END
$$;
GRANT apptgate_partner TO CURRENT_USER;
-- LOGIN without a password works only where the server trusts the connection (development,
-- CI); elsewhere give the role a password or certificate and set APPTGATE_PARTNER_DATABASE_URL.
ALTER ROLE apptgate_partner LOGIN;

GRANT USAGE ON SCHEMA public TO apptgate_partner;
GRANT SELECT (id, display_name, specialty) ON practitioners TO apptgate_partner;
GRANT SELECT (id, practitioner_id, patient_id, start_time, end_time, status, update_time) ON appointments
    TO apptgate_partner;
GRANT SELECT (id, partner_id, secret_hash, create_time, revoke_time) ON partner_keys TO apptgate_partner;
GRANT SELECT (partner_id, practitioner_id, revoke_time) ON practitioner_grants TO apptgate_partner;
GRANT SELECT (partner_id, requests_per_second, burst, contact_daily_cap, patient_daily_cap, suspend_time)
    ON partner_limits TO apptgate_partner;
GRANT SELECT ON appointment_changes, change_feed_head TO apptgate_partner;
GRANT EXECUTE ON FUNCTION append_disclosures(uuid, text, text, text, smallint, smallint, text, text[], uuid[], uuid[],
    smallint[], uuid) TO apptgate_partner;

-- The partner bound for the transaction; NULL when unset ('' after a transaction, or never
-- set in the session), so the policies below match nothing. Written without a SET clause and
-- with every name schema-qualified, so that the planner inlines it into each policy: a SET
-- clause would make it a function call per row filtered.
CREATE FUNCTION current_partner_id() RETURNS uuid
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN pg_catalog.current_setting('apptgate.partner_id', true) OPERATOR(pg_catalog.=) '' THEN NULL
        ELSE CAST(pg_catalog.current_setting('apptgate.partner_id', true) AS pg_catalog.uuid)
    END
$$;
GRANT EXECUTE ON FUNCTION current_partner_id() TO apptgate_partner;

-- FORCE applies the policies to the table owner too; the owner's own path (the internal
-- listener, the feed hub, the record statements) passes by a policy naming every role but
-- apptgate_partner.
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

-- A partner read's first step: refuse a dead key (AG401) or a suspended partner (AG403),
-- then bind the partner. The gateway verifies the key's secret itself, against the hash it
-- cached; these are the facts that change.
CREATE FUNCTION partner_bind(p_key_id text, p_partner_id uuid) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $$
DECLARE
    suspended timestamptz;
BEGIN
    PERFORM 1 FROM partner_keys k WHERE k.id = p_key_id AND k.partner_id = p_partner_id AND k.revoke_time IS NULL;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'invalid credentials' USING ERRCODE = 'AG401';
    END IF;
    SELECT l.suspend_time INTO suspended FROM partner_limits l WHERE l.partner_id = p_partner_id;
    IF suspended IS NOT NULL THEN
        RAISE EXCEPTION 'the partner is suspended' USING ERRCODE = 'AG403';
    END IF;
    PERFORM set_config('apptgate.partner_id', p_partner_id::text, true);
END
$$;
REVOKE ALL ON FUNCTION partner_bind(text, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION partner_bind(text, uuid) TO apptgate_partner;

-- What the partner path reads of an appointment: the basic view's columns, nothing more.
CREATE TYPE partner_appointment AS (
    id uuid, patient_id uuid, start_time timestamptz, end_time timestamptz, status appointment_status,
    update_time timestamptz, practitioner_id uuid, display_name text, specialty text
);

-- ListAppointments in one statement: up to p_limit appointments of granted practitioners
-- starting in [p_start, p_end), in (start_time, id) order, strictly after the cursor when
-- one is given; AG404 when p_practitioner_id is named and not granted. The page is taken
-- first and only its rows are joined to practitioners.
CREATE FUNCTION partner_list_appointments(
    p_key_id text, p_partner_id uuid, p_practitioner_id uuid, p_start timestamptz, p_end timestamptz,
    p_after_time timestamptz, p_after_id uuid, p_limit integer
) RETURNS SETOF partner_appointment
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $$
BEGIN
    PERFORM partner_bind(p_key_id, p_partner_id);
    IF p_practitioner_id IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM practitioner_grants g
        WHERE g.partner_id = p_partner_id AND g.practitioner_id = p_practitioner_id AND g.revoke_time IS NULL
    ) THEN
        RAISE EXCEPTION 'practitioner not found' USING ERRCODE = 'AG404';
    END IF;
    RETURN QUERY
    SELECT a.id, a.patient_id, a.start_time, a.end_time, a.status, a.update_time, p.id, p.display_name, p.specialty
    FROM (
        SELECT a.id, a.patient_id, a.practitioner_id, a.start_time, a.end_time, a.status, a.update_time
        FROM practitioner_grants g
        JOIN appointments a ON a.practitioner_id = g.practitioner_id
        WHERE g.partner_id = p_partner_id AND g.revoke_time IS NULL
          AND (p_practitioner_id IS NULL OR g.practitioner_id = p_practitioner_id)
          AND a.start_time >= p_start AND a.start_time < p_end
          AND (a.start_time, a.id) > (coalesce(p_after_time, '-infinity'),
                                      coalesce(p_after_id, '00000000-0000-0000-0000-000000000000'))
        ORDER BY a.start_time, a.id
        LIMIT p_limit
    ) a
    JOIN practitioners p ON p.id = a.practitioner_id
    ORDER BY a.start_time, a.id;
END
$$;
REVOKE ALL ON FUNCTION partner_list_appointments(text, uuid, uuid, timestamptz, timestamptz, timestamptz, uuid, integer)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION partner_list_appointments(text, uuid, uuid, timestamptz, timestamptz, timestamptz, uuid,
    integer) TO apptgate_partner;

-- GetAppointment and GetAppointmentContact's read: the appointment when it exists and its
-- practitioner granted the partner access; no row otherwise, whichever it is.
CREATE FUNCTION partner_get_appointment(p_key_id text, p_partner_id uuid, p_appointment_id uuid)
RETURNS SETOF partner_appointment
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $$
BEGIN
    PERFORM partner_bind(p_key_id, p_partner_id);
    RETURN QUERY
    SELECT a.id, a.patient_id, a.start_time, a.end_time, a.status, a.update_time, p.id, p.display_name, p.specialty
    FROM appointments a JOIN practitioners p ON p.id = a.practitioner_id
    WHERE a.id = p_appointment_id AND EXISTS (
        SELECT 1 FROM practitioner_grants g
        WHERE g.partner_id = p_partner_id AND g.practitioner_id = a.practitioner_id AND g.revoke_time IS NULL);
END
$$;
REVOKE ALL ON FUNCTION partner_get_appointment(text, uuid, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION partner_get_appointment(text, uuid, uuid) TO apptgate_partner;
