-- Basic-view records without counting a patient twice, and without regrouping the items.
--
-- record_partner_disclosures (0017) charged every patient of every response:
-- charge_partner_usage tries to insert each into partner_daily_patients, and
-- a patient the partner already reached today is a unique-index probe that
-- inserts nothing. Agenda tools list the same pages all day, so after the
-- first listing of a day every probe of a page finds its patient counted.
-- The gateway now remembers which patients it has seen counted for each
-- partner (service/store/usage.py, CountedPatients) and sends only the
-- others, with the counter row they were counted under: its counted_since,
-- the transaction that created the partner's row for the day. The database
-- still decides: when the partner's row for the statement's day (UTC) is not
-- that row (another day, or the day's counters deleted and started again),
-- every patient is charged as before. The count is the same either way: a
-- patient left out is one counted under the row that stands, so its insert
-- would have added nothing.
--
-- The items of each response also arrive as slices of the flat arrays (its
-- last item's position in p_response_ends), not tagged with their response
-- and regrouped by unnest, GROUP BY and three ordered array_agg.
--
-- Measured with pgbench on the bench world (one client, prepared statements,
-- synchronous_commit off, the record of one page of 50 whose patients are all
-- counted; SELECT 1 takes 0.06 ms): record_partner_disclosures 0.46-0.49 ms;
-- this function charging every patient 0.38 ms, and with no patient left to
-- charge 0.32-0.33 ms.
--
-- Returns each charged partner's outcome and its counter row's counted_since
-- (NULL when it has none), which the gateway's memo follows. Everything else
-- is record_partner_disclosures': partners charged in the order given, AG429
-- over a daily cap with nothing counted or recorded, nothing recorded for a
-- partner its charge suspended. record_partner_disclosures stays: a gateway
-- of the previous version still calls it while a rolling upgrade is under way.

-- Which counter row a count belongs to: the transaction that created it. A row deleted and
-- created again (counters started over) has another; the charge's upsert keeps it.
ALTER TABLE partner_daily_usage ADD COLUMN counted_since xid8 NOT NULL DEFAULT pg_current_xact_id();

CREATE FUNCTION record_basic_disclosures(
    -- One element per response; p_response_ends[n] is the position of response n's last item.
    p_response_partners uuid[], p_key_ids text[], p_rpcs text[], p_trace_ids text[], p_response_ends integer[],
    -- One element per appointment, the responses' items one after the other.
    p_requested_ids text[], p_appointment_ids uuid[], p_patient_ids uuid[],
    -- One element per partner to charge, and its terms.
    p_partners uuid[], p_contact_caps integer[], p_patient_caps integer[], p_anomaly_factors double precision[],
    p_anomaly_mins bigint[], p_suspends boolean[],
    -- Per partner: the counter row (counted_since) the caller knows some of its patients counted
    -- under, or NULL; and the others, slices of p_new_patients ending at p_new_patient_ends[i].
    p_counted_since bigint[], p_new_patient_ends integer[], p_new_patients uuid[]
) RETURNS TABLE (partner_id uuid, outcome text, counted_since bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $$
#variable_conflict use_column
DECLARE
    responses integer := coalesce(cardinality(p_response_partners), 0);
    items     integer := coalesce(cardinality(p_patient_ids), 0);
    partners  integer := coalesce(cardinality(p_partners), 0);
    today     date := (statement_timestamp() AT TIME ZONE 'UTC')::date;  -- charge_partner_usage's day
    suspended uuid[] := '{}';
    patients  uuid[];
    charged   text;
    since     bigint;
BEGIN
    IF cardinality(p_key_ids) IS DISTINCT FROM responses OR cardinality(p_rpcs) IS DISTINCT FROM responses
       OR cardinality(p_trace_ids) IS DISTINCT FROM responses
       OR cardinality(p_response_ends) IS DISTINCT FROM responses
       OR coalesce(p_response_ends[responses], 0) IS DISTINCT FROM items
       OR cardinality(p_appointment_ids) IS DISTINCT FROM items
       OR cardinality(p_requested_ids) IS DISTINCT FROM items
       OR cardinality(p_counted_since) IS DISTINCT FROM partners
       OR cardinality(p_new_patient_ends) IS DISTINCT FROM partners
       OR coalesce(p_new_patient_ends[partners], 0) IS DISTINCT FROM coalesce(cardinality(p_new_patients), 0) THEN
        RAISE EXCEPTION 'record_basic_disclosures: arrays of different lengths';
    END IF;
    FOR i IN 1 .. partners LOOP
        SELECT u.counted_since::text::bigint INTO since
        FROM partner_daily_usage u WHERE u.partner_id = p_partners[i] AND u.day = today;
        IF since = p_counted_since[i] THEN
            patients := p_new_patients[coalesce(p_new_patient_ends[i - 1], 0) + 1 : p_new_patient_ends[i]];
        ELSIF partners = 1 AND p_response_partners <@ p_partners THEN  -- every response is this partner's
            patients := p_patient_ids;
        ELSE
            patients := ARRAY(
                SELECT p_patient_ids[k]
                FROM generate_series(1, responses) AS r(n),
                     generate_series(coalesce(p_response_ends[r.n - 1], 0) + 1, p_response_ends[r.n]) AS k
                WHERE p_response_partners[r.n] = p_partners[i]);
        END IF;
        charged := charge_partner_usage(p_partners[i], patients, cardinality(patients), 0, p_contact_caps[i],
                                        p_patient_caps[i], p_anomaly_factors[i], p_anomaly_mins[i], p_suspends[i]);
        IF charged IN ('contact_cap', 'patient_cap') THEN
            RAISE EXCEPTION 'daily cap reached' USING ERRCODE = 'AG429', DETAIL = charged, HINT = p_partners[i]::text;
        END IF;
        IF charged = 'suspended' THEN
            suspended := suspended || p_partners[i];
        END IF;
        IF since IS NULL THEN  -- the charge may have created the row
            SELECT u.counted_since::text::bigint INTO since
            FROM partner_daily_usage u WHERE u.partner_id = p_partners[i] AND u.day = today;
        END IF;
        partner_id := p_partners[i];
        outcome := charged;
        counted_since := since;
        RETURN NEXT;
    END LOOP;
    INSERT INTO disclosures (partner_id, key_id, view, contact_fields, consent_id, rpc, trace_id, disclose_time,
                             outcome, denial_reason, requested_ids, appointment_ids, patient_ids)
    SELECT r.partner_id, r.key_id, 1, '{}', NULL, r.rpc, r.trace_id, statement_timestamp(), 1, '',
           p_requested_ids[r.first : r.last], p_appointment_ids[r.first : r.last], p_patient_ids[r.first : r.last]
    FROM (
        SELECT r.partner_id, r.key_id, r.rpc, r.trace_id, r.n,
               coalesce(p_response_ends[r.n - 1], 0) + 1 AS first, p_response_ends[r.n] AS last
        FROM unnest(p_response_partners, p_key_ids, p_rpcs, p_trace_ids) WITH ORDINALITY
             AS r(partner_id, key_id, rpc, trace_id, n)
    ) r
    WHERE r.last >= r.first AND r.partner_id <> ALL (suspended)  -- a response with no item has no record
    ORDER BY r.n;
END
$$;
-- The gateway calls it on its own (owner) path; the partner role cannot.
REVOKE ALL ON FUNCTION record_basic_disclosures(uuid[], text[], text[], text[], integer[], text[], uuid[], uuid[],
    uuid[], integer[], integer[], double precision[], bigint[], boolean[], bigint[], integer[], uuid[]) FROM PUBLIC;
