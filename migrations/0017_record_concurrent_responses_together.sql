-- The basic-view responses of concurrent calls recorded in one statement: one commit for all.
--
-- Each ListAppointments or GetAppointment response committed its own record
-- before it was sent, so every call paid a WAL flush. Measured after 0016
-- (bench/run.py, 100k world, one gateway process): at c=64 GetAppointment
-- spent 1.57 ms of PostgreSQL CPU per call with 1.56 backends waiting on
-- LWLock/WALWrite on average, against 0.20 ms for the same read without a
-- record. The gateway now hands the records of the calls that are waiting at
-- the same moment to this function (service/recorder.py): one statement, one
-- transaction, one flush, and each response still leaves only after its
-- record is durable.
--
-- The usage of each partner in the group is charged once, partners in the
-- order given (sorted by the caller, so concurrent groups lock counters in the
-- same order). Over a daily cap the whole statement fails with AG429, the cap
-- in DETAIL and the partner in HINT: nothing is counted or recorded, and the
-- gateway records the group again without that partner, whose calls it then
-- records one by one so that the cap stays exact. A partner suspended by its
-- charge has nothing recorded (its calls send nothing). Returns each charged
-- partner's outcome.
CREATE FUNCTION record_partner_disclosures(
    -- One element per response.
    p_response_partners uuid[], p_key_ids text[], p_rpcs text[], p_trace_ids text[],
    -- One element per appointment: the response it belongs to (1-based) and its ids.
    p_item_responses integer[], p_requested_ids text[], p_appointment_ids uuid[], p_patient_ids uuid[],
    -- One element per partner to charge, and its terms.
    p_partners uuid[], p_contact_caps integer[], p_patient_caps integer[], p_anomaly_factors double precision[],
    p_anomaly_mins bigint[], p_suspends boolean[]
) RETURNS TABLE (partner_id uuid, outcome text)
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $$
#variable_conflict use_column
DECLARE
    suspended uuid[] := '{}';
    patients  uuid[];
    charged   text;
BEGIN
    IF cardinality(p_item_responses) IS DISTINCT FROM cardinality(p_patient_ids)
       OR cardinality(p_item_responses) IS DISTINCT FROM cardinality(p_appointment_ids)
       OR cardinality(p_item_responses) IS DISTINCT FROM cardinality(p_requested_ids) THEN
        RAISE EXCEPTION 'record_partner_disclosures: item arrays of different lengths';
    END IF;
    FOR i IN 1 .. coalesce(cardinality(p_partners), 0) LOOP
        patients := ARRAY(SELECT x.patient_id FROM unnest(p_item_responses, p_patient_ids) AS x(r, patient_id)
                          WHERE p_response_partners[x.r] = p_partners[i]);
        charged := charge_partner_usage(p_partners[i], patients, cardinality(patients), 0, p_contact_caps[i],
                                        p_patient_caps[i], p_anomaly_factors[i], p_anomaly_mins[i], p_suspends[i]);
        IF charged IN ('contact_cap', 'patient_cap') THEN
            RAISE EXCEPTION 'daily cap reached' USING ERRCODE = 'AG429', DETAIL = charged, HINT = p_partners[i]::text;
        END IF;
        IF charged = 'suspended' THEN
            suspended := suspended || p_partners[i];
        END IF;
        partner_id := p_partners[i];
        outcome := charged;
        RETURN NEXT;
    END LOOP;
    INSERT INTO disclosures (partner_id, key_id, view, contact_fields, consent_id, rpc, trace_id, disclose_time,
                             outcome, denial_reason, requested_ids, appointment_ids, patient_ids)
    SELECT r.partner_id, r.key_id, 1, '{}', NULL, r.rpc, r.trace_id, statement_timestamp(), 1, '',
           i.requested_ids, i.appointment_ids, i.patient_ids
    FROM unnest(p_response_partners, p_key_ids, p_rpcs, p_trace_ids) WITH ORDINALITY
         AS r(partner_id, key_id, rpc, trace_id, n)
    JOIN (
        SELECT u.r, array_agg(u.requested_id ORDER BY u.k) AS requested_ids,
               array_agg(u.appointment_id ORDER BY u.k) AS appointment_ids,
               array_agg(u.patient_id ORDER BY u.k) AS patient_ids
        FROM unnest(p_item_responses, p_requested_ids, p_appointment_ids, p_patient_ids) WITH ORDINALITY
             AS u(r, requested_id, appointment_id, patient_id, k)
        GROUP BY u.r
    ) i ON i.r = r.n
    WHERE r.partner_id <> ALL (suspended)
    ORDER BY r.n;
END
$$;
-- The gateway calls it on its own (owner) path; the partner role cannot.
REVOKE ALL ON FUNCTION record_partner_disclosures(uuid[], text[], text[], text[], integer[], text[], uuid[], uuid[],
    uuid[], integer[], integer[], double precision[], bigint[], boolean[]) FROM PUBLIC;
