-- A partner call in two statements instead of eight round trips.
--
-- Until now a partner read ran BEGIN; SET LOCAL …; the key lookup; the read;
-- the usage charge; the ledger append; COMMIT, and the pool's reset query on
-- release: eight round trips, each costing the gateway more CPU than the read
-- itself (bench: 24% of the gateway's samples were socket writes to
-- PostgreSQL). Now a call is:
--
--   1. one read statement (its own transaction), run as apptgate_partner:
--      it checks the key is still live and its partner not suspended, binds
--      the partner for row-level security, and reads; nothing is written;
--   2. one record statement (its own transaction): the usage charge and the
--      ledger records of what the response discloses, committed before the
--      response is sent, exactly as before.
--
-- The gateway verifies the key's secret itself, in constant time, against the
-- key's hash it has cached (a key's id, partner and hash never change); the
-- read statement re-checks the live facts (revocation, suspension) on every
-- call, so a revoked key or a suspended partner is refused on its next call.
-- Errors are raised with SQLSTATEs of class AG that the gateway maps to its
-- own answers: AG401 the key is unknown or revoked (or belongs to another
-- partner), AG403 the partner is suspended, AG404 the practitioner asked for
-- is not granted, AG429 a daily cap is reached (the charge rolls back).

-- Statement 1's first step: refuse a dead key or a suspended partner, bind the partner.
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

-- ListAppointments: up to p_limit appointments of granted practitioners starting in
-- [p_start, p_end), in (start_time, id) order, strictly after the cursor when one is given.
-- The page is taken first and only its rows are joined to practitioners.
CREATE FUNCTION partner_list_appointments(
    p_key_id text, p_partner_id uuid, p_practitioner_id uuid, p_start timestamptz, p_end timestamptz,
    p_after_time timestamptz, p_after_id uuid, p_limit integer
) RETURNS TABLE (
    id uuid, patient_id uuid, start_time timestamptz, end_time timestamptz, status text,
    update_time timestamptz, practitioner_id uuid, display_name text, specialty text
)
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $$
#variable_conflict use_column
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

-- GetAppointment and the first statement of GetAppointmentContact: the appointment when it
-- exists and its practitioner granted the partner access; no row otherwise.
CREATE FUNCTION partner_get_appointment(p_key_id text, p_partner_id uuid, p_appointment_id uuid)
RETURNS TABLE (
    id uuid, patient_id uuid, start_time timestamptz, end_time timestamptz, status text,
    update_time timestamptz, practitioner_id uuid, display_name text, specialty text
)
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $$
#variable_conflict use_column
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

-- Statement 2 of a basic read: count the response against the partner's day, then record
-- it. A cap raises AG429 (nothing counted, nothing recorded); 'suspended' commits the
-- suspension and records nothing (the gateway then sends nothing); otherwise the records
-- are appended and the charge's outcome ('ok' or 'flagged') returned.
CREATE FUNCTION record_partner_disclosure(
    p_partner_id uuid, p_key_id text, p_rpc text, p_trace_id text, p_view smallint,
    p_requested_ids text[], p_appointment_ids uuid[], p_patient_ids uuid[], p_contact_fields smallint[],
    p_consent_id uuid, p_contacts integer, p_contact_cap integer, p_patient_cap integer,
    p_anomaly_factor double precision, p_anomaly_min bigint, p_suspend boolean
) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $$
DECLARE
    outcome text;
BEGIN
    outcome := charge_partner_usage(p_partner_id, p_patient_ids, cardinality(p_patient_ids), p_contacts,
                                    p_contact_cap, p_patient_cap, p_anomaly_factor, p_anomaly_min, p_suspend);
    IF outcome IN ('contact_cap', 'patient_cap') THEN
        RAISE EXCEPTION 'daily cap reached' USING ERRCODE = 'AG429', DETAIL = outcome;
    END IF;
    IF outcome = 'suspended' THEN
        RETURN outcome;
    END IF;
    PERFORM append_disclosures(p_partner_id, p_key_id, p_rpc, p_trace_id, p_view, 1::smallint, '',
                               p_requested_ids, p_appointment_ids, p_patient_ids, p_contact_fields, p_consent_id);
    RETURN outcome;
END
$$;

-- Statement 2 of GetAppointmentContact: the consent check, the charge, the ledger record and
-- the sealed values, in one transaction. The fields released are those both the token and
-- the stored consent name. A consent that is not live returns its state and records nothing
-- (the gateway records the refusal); a cap raises AG429; 'suspended' records nothing and
-- returns no value.
CREATE FUNCTION disclose_consented_contact(
    p_partner_id uuid, p_key_id text, p_rpc text, p_trace_id text, p_requested_id text,
    p_appointment_id uuid, p_patient_id uuid, p_consent_id uuid, p_token_fields smallint[],
    p_contact_cap integer, p_patient_cap integer, p_anomaly_factor double precision, p_anomaly_min bigint,
    p_suspend boolean
) RETURNS TABLE (
    state text, fields smallint[],
    sealed_given_name bytea, sealed_family_name bytea, sex smallint, sealed_phone bytea, sealed_email bytea,
    given_name text, family_name text, phone text, email text
)
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $$
#variable_conflict use_column
DECLARE
    c       record;
    granted smallint[];
    outcome text;
BEGIN
    SELECT * INTO c FROM read_consented_contact(p_consent_id, p_partner_id, p_patient_id);
    IF c.state <> 'live' THEN
        RETURN QUERY SELECT c.state, c.fields, NULL::bytea, NULL::bytea, NULL::smallint, NULL::bytea, NULL::bytea,
            NULL::text, NULL::text, NULL::text, NULL::text;
        RETURN;
    END IF;
    granted := ARRAY(SELECT DISTINCT f FROM unnest(c.fields) AS f WHERE f = ANY (p_token_fields) ORDER BY f);
    outcome := record_partner_disclosure(
        p_partner_id, p_key_id, p_rpc, p_trace_id, 2::smallint, ARRAY[p_requested_id], ARRAY[p_appointment_id],
        ARRAY[p_patient_id], granted, p_consent_id, 1, p_contact_cap, p_patient_cap, p_anomaly_factor,
        p_anomaly_min, p_suspend);
    IF outcome = 'suspended' THEN
        RETURN QUERY SELECT 'suspended'::text, '{}'::smallint[], NULL::bytea, NULL::bytea, NULL::smallint,
            NULL::bytea, NULL::bytea, NULL::text, NULL::text, NULL::text, NULL::text;
        RETURN;
    END IF;
    RETURN QUERY SELECT outcome, granted,
        CASE WHEN 1 = ANY (granted) THEN c.sealed_given_name END,
        CASE WHEN 1 = ANY (granted) THEN c.sealed_family_name END,
        CASE WHEN 2 = ANY (granted) THEN c.sex END,
        CASE WHEN 3 = ANY (granted) THEN c.sealed_phone END,
        CASE WHEN 4 = ANY (granted) THEN c.sealed_email END,
        CASE WHEN 1 = ANY (granted) THEN c.given_name END,
        CASE WHEN 1 = ANY (granted) THEN c.family_name END,
        CASE WHEN 3 = ANY (granted) THEN c.phone END,
        CASE WHEN 4 = ANY (granted) THEN c.email END;
END
$$;

REVOKE ALL ON FUNCTION partner_bind(text, uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION partner_list_appointments(text, uuid, uuid, timestamptz, timestamptz, timestamptz, uuid, integer)
    FROM PUBLIC;
REVOKE ALL ON FUNCTION partner_get_appointment(text, uuid, uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION record_partner_disclosure(uuid, text, text, text, smallint, text[], uuid[], uuid[], smallint[],
    uuid, integer, integer, integer, double precision, bigint, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION disclose_consented_contact(uuid, text, text, text, text, uuid, uuid, uuid, smallint[], integer,
    integer, double precision, bigint, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION partner_bind(text, uuid) TO apptgate_partner;
GRANT EXECUTE ON FUNCTION partner_list_appointments(text, uuid, uuid, timestamptz, timestamptz, timestamptz, uuid,
    integer) TO apptgate_partner;
GRANT EXECUTE ON FUNCTION partner_get_appointment(text, uuid, uuid) TO apptgate_partner;
GRANT EXECUTE ON FUNCTION record_partner_disclosure(uuid, text, text, text, smallint, text[], uuid[], uuid[],
    smallint[], uuid, integer, integer, integer, double precision, bigint, boolean) TO apptgate_partner;
GRANT EXECUTE ON FUNCTION disclose_consented_contact(uuid, text, text, text, text, uuid, uuid, uuid, smallint[],
    integer, integer, double precision, bigint, boolean) TO apptgate_partner;
