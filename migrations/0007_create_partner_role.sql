-- The partner path's own role, apptgate_partner, and the only things it may do: call the
-- functions below, each of which takes the caller's key id and credential, verifies both on
-- every call, derives the partner from the key, and reads or writes for that partner only.
--
-- A credential is the SHA-256 of the secret presented (32 bytes), followed, when the call came
-- over a connection with a client certificate (mutual TLS), by the SHA-256 of that
-- certificate (32 more): a key bound to a certificate verifies only over a connection that
-- presented it.
--
-- The role holds no privilege on any table, so nothing it can set (a setting, a parameter, a
-- statement of its own) makes it see another partner's rows, a key's hash, a contact value
-- or a reason, or write a record for another partner or with caps of its choosing. The
-- functions run as their owner (SECURITY DEFINER) with a fixed search_path.
--
-- Partner statements run as this role, logged in as it where the server allows (then the
-- session cannot switch back to the owner), else by SET LOCAL ROLE on the owner's pool. Roles
-- belong to the cluster, so creating it is guarded; the migrating user (who also serves)
-- becomes a member so that it can switch to it. Refusals are SQLSTATEs the gateway maps:
-- AG401 the key is unknown, revoked or its secret wrong; AG403 the partner is suspended; AG404
-- the practitioner asked for is not granted.

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

-- What the partner path reads of an appointment: the basic view's columns, nothing more.
CREATE TYPE partner_appointment AS (
    id uuid, patient_id uuid, start_time timestamptz, end_time timestamptz, status appointment_status,
    update_time timestamptz, practitioner_id uuid, display_name text, specialty text
);

-- A change of the feed as the partner path reads it: the appointment's basic view after it.
CREATE TYPE partner_change AS (
    position bigint, change_type smallint, id uuid, patient_id uuid, start_time timestamptz,
    end_time timestamptz, status appointment_status, update_time timestamptz, practitioner_id uuid,
    display_name text, specialty text
);

-- The partner of a live key presented with its secret's hash, over its bound certificate if it
-- has one; NULL for anything else, a key over the wrong certificate as a wrong secret.
CREATE FUNCTION partner_of_key(p_key_id text, p_credential bytea) RETURNS uuid
LANGUAGE sql STABLE
SET search_path = pg_catalog, public
AS $$
    SELECT k.partner_id FROM partner_keys k
    WHERE k.id = p_key_id AND k.secret_hash = substring(p_credential FROM 1 FOR 32) AND k.revoke_time IS NULL
      AND length(p_credential) IN (32, 64)
      AND (k.client_cert_sha256 IS NULL OR k.client_cert_sha256 = substring(p_credential FROM 33))
$$;
REVOKE ALL ON FUNCTION partner_of_key(text, bytea) FROM PUBLIC;

-- The partner of a live key whose partner is not suspended; AG401 or AG403 otherwise.
CREATE FUNCTION partner_admit(p_key_id text, p_credential bytea) RETURNS uuid
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, public
AS $$
DECLARE
    partner uuid := partner_of_key(p_key_id, p_credential);
BEGIN
    IF partner IS NULL THEN
        RAISE EXCEPTION 'invalid credentials' USING ERRCODE = 'AG401';
    END IF;
    IF EXISTS (SELECT 1 FROM partner_limits l WHERE l.partner_id = partner AND l.suspend_time IS NOT NULL) THEN
        RAISE EXCEPTION 'the partner is suspended' USING ERRCODE = 'AG403';
    END IF;
    RETURN partner;
END
$$;
REVOKE ALL ON FUNCTION partner_admit(text, bytea) FROM PUBLIC;

-- A key's partner and the limits the database holds for it (suspension included): no row for
-- a key that is unknown, revoked or presented with the wrong secret. Never a key's hash.
CREATE FUNCTION partner_authenticate(p_key_id text, p_credential bytea)
RETURNS TABLE (
    partner_id uuid, requests_per_second double precision, burst integer, contact_daily_cap integer,
    patient_daily_cap integer, suspend_time timestamptz
)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
    SELECT p.id, l.requests_per_second, l.burst, l.contact_daily_cap, l.patient_daily_cap, l.suspend_time
    FROM partners p LEFT JOIN partner_limits l ON l.partner_id = p.id
    WHERE p.id = partner_of_key(p_key_id, p_credential)
$$;
REVOKE ALL ON FUNCTION partner_authenticate(text, bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION partner_authenticate(text, bytea) TO apptgate_partner;

-- ListAppointments in one statement: up to p_limit appointments of the key's partner's
-- granted practitioners starting in [p_start, p_end), in (start_time, id) order, strictly
-- after the cursor when one is given; AG404 when p_practitioner_id is named and not granted.
-- The page is taken first and only its rows are joined to practitioners.
CREATE FUNCTION partner_list_appointments(
    p_key_id text, p_credential bytea, p_practitioner_id uuid, p_start timestamptz, p_end timestamptz,
    p_after_time timestamptz, p_after_id uuid, p_limit integer
) RETURNS SETOF partner_appointment
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
    partner uuid := partner_admit(p_key_id, p_credential);
BEGIN
    IF p_practitioner_id IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM practitioner_grants g
        WHERE g.partner_id = partner AND g.practitioner_id = p_practitioner_id AND g.revoke_time IS NULL
    ) THEN
        RAISE EXCEPTION 'practitioner not found' USING ERRCODE = 'AG404';
    END IF;
    RETURN QUERY
    SELECT a.id, a.patient_id, a.start_time, a.end_time, a.status, a.update_time, p.id, p.display_name, p.specialty
    FROM (
        SELECT a.id, a.patient_id, a.practitioner_id, a.start_time, a.end_time, a.status, a.update_time
        FROM practitioner_grants g
        JOIN appointments a ON a.practitioner_id = g.practitioner_id
        WHERE g.partner_id = partner AND g.revoke_time IS NULL
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
REVOKE ALL ON FUNCTION partner_list_appointments(text, bytea, uuid, timestamptz, timestamptz, timestamptz, uuid,
    integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION partner_list_appointments(text, bytea, uuid, timestamptz, timestamptz, timestamptz, uuid,
    integer) TO apptgate_partner;

-- GetAppointment and GetAppointmentContact's read: the appointment when it exists and its
-- practitioner granted the key's partner access; no row otherwise, whichever it is.
CREATE FUNCTION partner_get_appointment(p_key_id text, p_credential bytea, p_appointment_id uuid)
RETURNS SETOF partner_appointment
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
    partner uuid := partner_admit(p_key_id, p_credential);
BEGIN
    RETURN QUERY
    SELECT a.id, a.patient_id, a.start_time, a.end_time, a.status, a.update_time, p.id, p.display_name, p.specialty
    FROM appointments a JOIN practitioners p ON p.id = a.practitioner_id
    WHERE a.id = p_appointment_id AND EXISTS (
        SELECT 1 FROM practitioner_grants g
        WHERE g.partner_id = partner AND g.practitioner_id = a.practitioner_id AND g.revoke_time IS NULL);
END
$$;
REVOKE ALL ON FUNCTION partner_get_appointment(text, bytea, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION partner_get_appointment(text, bytea, uuid) TO apptgate_partner;

-- A refused attempt of the key's partner, as one ledger record of outcome "denied" (a probe
-- for something not visible, a consent refused): the partner comes from the key, the time and
-- id from the database, the reason must be given. A suspended partner's refusals are recorded.
CREATE FUNCTION partner_record_refusal(
    p_key_id text, p_credential bytea, p_rpc text, p_trace_id text, p_view smallint, p_denial_reason text,
    p_requested_ids text[], p_appointment_ids uuid[], p_patient_ids uuid[], p_consent_id uuid
) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
    partner uuid := partner_of_key(p_key_id, p_credential);
BEGIN
    IF partner IS NULL THEN
        RAISE EXCEPTION 'invalid credentials' USING ERRCODE = 'AG401';
    END IF;
    INSERT INTO disclosures (partner_id, key_id, view, consent_id, rpc, trace_id, client_cert, outcome,
                             denial_reason, requested_ids, appointment_ids, patient_ids)
    VALUES (partner, p_key_id, p_view, p_consent_id, p_rpc, coalesce(p_trace_id, ''),
            encode(substring(p_credential FROM 33), 'hex'), 2, p_denial_reason, p_requested_ids,
            p_appointment_ids, p_patient_ids);
END
$$;
REVOKE ALL ON FUNCTION partner_record_refusal(text, bytea, text, text, smallint, text, text[], uuid[], uuid[], uuid)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION partner_record_refusal(text, bytea, text, text, smallint, text, text[], uuid[], uuid[], uuid)
    TO apptgate_partner;

-- WatchAppointments' opening: the key's partner and its limits, the practitioners granted to
-- it, and the change feed's head and retention mark, read together; no row for a bad key.
CREATE FUNCTION partner_watch(p_key_id text, p_credential bytea)
RETURNS TABLE (
    partner_id uuid, requests_per_second double precision, burst integer, contact_daily_cap integer,
    patient_daily_cap integer, suspend_time timestamptz, granted uuid[], head bigint, pruned_through bigint
)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
    SELECT a.partner_id, a.requests_per_second, a.burst, a.contact_daily_cap, a.patient_daily_cap, a.suspend_time,
           ARRAY(SELECT g.practitioner_id FROM practitioner_grants g
                 WHERE g.partner_id = a.partner_id AND g.revoke_time IS NULL),
           h.position, h.pruned_through
    FROM partner_authenticate(p_key_id, p_credential) a CROSS JOIN change_feed_head h
$$;
REVOKE ALL ON FUNCTION partner_watch(text, bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION partner_watch(text, bytea) TO apptgate_partner;

-- A stream's replay: the changes in (p_after, p_upto] of the practitioners asked for, each
-- only if the key's partner held a grant of its practitioner when it was made, so a stream
-- resumed after a grant was revoked and given again does not see what happened in between.
CREATE FUNCTION partner_changes(
    p_key_id text, p_credential bytea, p_after bigint, p_upto bigint, p_limit integer, p_practitioners uuid[]
) RETURNS SETOF partner_change
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
    partner uuid := partner_admit(p_key_id, p_credential);
BEGIN
    RETURN QUERY
    SELECT c.position, c.change_type, c.appointment_id, c.patient_id, c.start_time, c.end_time, c.status,
           c.update_time, p.id, p.display_name, p.specialty
    FROM appointment_changes c JOIN practitioners p ON p.id = c.practitioner_id
    WHERE c.position > p_after AND c.position <= p_upto AND c.practitioner_id = ANY (p_practitioners)
      AND EXISTS (
          SELECT 1 FROM practitioner_grants g
          WHERE g.partner_id = partner AND g.practitioner_id = c.practitioner_id AND g.grant_time <= c.commit_time
            AND (g.revoke_time IS NULL OR g.revoke_time > c.commit_time))
    ORDER BY c.position
    LIMIT p_limit;
END
$$;
REVOKE ALL ON FUNCTION partner_changes(text, bytea, bigint, bigint, integer, uuid[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION partner_changes(text, bytea, bigint, bigint, integer, uuid[]) TO apptgate_partner;
