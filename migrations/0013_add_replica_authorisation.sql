-- Reads on streaming replicas, decisions on the primary.
--
-- A partner's basic reads may run on a replica (APPTGATE_READ_REPLICA_URLS), whose copy of the
-- keys, suspensions and grants lags the primary's. Such an answer is recorded by
-- record_checked_basic_disclosures, which first decides on the primary, in the statement that
-- records it, whether the key is still live, the partner not suspended, and every practitioner
-- the answer shows still granted. An answer it does not authorise is neither recorded nor sent:
-- AG412 names the responses refused (positions in DETAIL), nothing of the group is written, and
-- the gateway reads those again on the primary and writes the others again.

-- record_basic_disclosures' group, with per response the practitioners its answer shows when it
-- was read on a replica: a slice of p_practitioners ending at p_practitioner_ends[n], empty for
-- a response read on the primary (decided by the read itself).
CREATE FUNCTION record_checked_basic_disclosures(
    p_practitioner_ends integer[], p_practitioners uuid[],
    p_response_partners uuid[], p_key_ids text[], p_rpcs text[], p_trace_ids text[], p_response_ends integer[],
    p_items_of bigint[], p_items_digests text[],
    p_requested_ids text[], p_appointment_ids uuid[], p_patient_ids uuid[],
    p_partners uuid[], p_contact_caps integer[], p_patient_caps integer[], p_anomaly_factors double precision[],
    p_anomaly_mins bigint[], p_suspends boolean[],
    p_counted_since bigint[], p_new_patient_ends integer[], p_new_patients uuid[],
    p_client_certs text[]
) RETURNS TABLE (partner_id uuid, outcome charge_outcome, counted_since bigint, record_ids bigint[])
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $$
#variable_conflict use_column
DECLARE
    refused integer[];
BEGIN
    IF cardinality(p_practitioner_ends) IS DISTINCT FROM cardinality(p_response_partners)
       OR coalesce(p_practitioner_ends[cardinality(p_practitioner_ends)], 0)
          IS DISTINCT FROM coalesce(cardinality(p_practitioners), 0) THEN
        RAISE EXCEPTION 'record_checked_basic_disclosures: arrays of different lengths';
    END IF;
    refused := ARRAY(
        SELECT r.n
        FROM unnest(p_response_partners, p_key_ids, p_practitioner_ends) WITH ORDINALITY AS r(partner_id, key_id, last, n)
        WHERE r.last > coalesce(p_practitioner_ends[r.n - 1], 0)
          AND (NOT EXISTS (
                   SELECT 1 FROM partner_keys k
                   WHERE k.id = r.key_id AND k.partner_id = r.partner_id AND k.revoke_time IS NULL
                     AND (k.expire_time IS NULL OR k.expire_time > statement_timestamp()))
               OR EXISTS (
                   SELECT 1 FROM partner_limits l WHERE l.partner_id = r.partner_id AND l.suspend_time IS NOT NULL)
               OR EXISTS (
                   SELECT 1
                   FROM unnest(p_practitioners[coalesce(p_practitioner_ends[r.n - 1], 0) + 1 : r.last]) AS p(id)
                   WHERE NOT EXISTS (
                       SELECT 1 FROM practitioner_grants g
                       WHERE g.partner_id = r.partner_id AND g.practitioner_id = p.id AND g.revoke_time IS NULL)))
        ORDER BY r.n);
    IF cardinality(refused) > 0 THEN
        RAISE EXCEPTION 'answers read on a replica that the primary does not authorise'
            USING ERRCODE = 'AG412', DETAIL = array_to_string(refused, ',');
    END IF;
    RETURN QUERY SELECT * FROM record_basic_disclosures(
        p_response_partners, p_key_ids, p_rpcs, p_trace_ids, p_response_ends, p_items_of, p_items_digests,
        p_requested_ids, p_appointment_ids, p_patient_ids, p_partners, p_contact_caps, p_patient_caps,
        p_anomaly_factors, p_anomaly_mins, p_suspends, p_counted_since, p_new_patient_ends, p_new_patients,
        p_client_certs);
END
$$;
REVOKE ALL ON FUNCTION record_checked_basic_disclosures(integer[], uuid[], uuid[], text[], text[], text[], integer[],
    bigint[], text[], text[], uuid[], uuid[], uuid[], integer[], integer[], double precision[], bigint[], boolean[],
    bigint[], integer[], uuid[], text[])
    FROM PUBLIC;
