-- A group of basic views with no patient left to charge no longer calls charge_partner_usage.
--
-- Agenda tools list the same pages all day, so once a partner's patients of the
-- day are counted, nearly every group the gateway records sends no patient to
-- charge: its memo knows them all (0020), and a reference charges none (0021).
-- charge_partner_usage then answers 'ok' (0012: nothing new, no contact), but
-- only after its call: a SECURITY DEFINER function with its own settings, and
-- an INSERT ... ON CONFLICT of no rows to find that out. Without that call, a
-- repeated page's record statement costs its backend 320 / 385 µs of CPU
-- instead of 370 / 425 (min / median, bench/record_cost.py, both functions
-- alternated in one run), a page written in full 450 / 565 instead of 500 / 585.
--
-- The function below is 0021's with the charge skipped when there is no patient
-- to charge; every answer and every row it writes is the same.

-- enable_seqscan is off inside it: the function's statements are planned once
-- per connection and the plans kept, and on a ledger that starts empty (a new
-- database, a new partition) and is analysed while it holds a few rows, its
-- lookups of records by id were planned as sequential scans, which then grew
-- with the ledger (the soak's PostgreSQL CPU per call doubled in four minutes;
-- docs/robustness.md). Every lookup here has its index.
CREATE OR REPLACE FUNCTION record_basic_disclosures(
    p_response_partners uuid[], p_key_ids text[], p_rpcs text[], p_trace_ids text[], p_response_ends integer[],
    p_items_of bigint[], p_items_digests text[],
    p_requested_ids text[], p_appointment_ids uuid[], p_patient_ids uuid[],
    p_partners uuid[], p_contact_caps integer[], p_patient_caps integer[], p_anomaly_factors double precision[],
    p_anomaly_mins bigint[], p_suspends boolean[],
    p_counted_since bigint[], p_new_patient_ends integer[], p_new_patients uuid[]
) RETURNS TABLE (partner_id uuid, outcome text, counted_since bigint, record_ids bigint[])
LANGUAGE plpgsql
SET search_path = pg_catalog, public
SET enable_seqscan = off
AS $$
#variable_conflict use_column
DECLARE
    responses integer := coalesce(cardinality(p_response_partners), 0);
    items     integer := coalesce(cardinality(p_patient_ids), 0);
    partners  integer := coalesce(cardinality(p_partners), 0);
    today     date := (statement_timestamp() AT TIME ZONE 'UTC')::date;  -- charge_partner_usage's day
    suspended uuid[] := '{}';
    outcomes  text[] := '{}';
    sinces    bigint[] := '{}';
    ids       bigint[] := '{}';
    refs      bigint[] := '{}';
    named     bigint[];
    patients  uuid[];
    charged   text;
    since     bigint;
BEGIN
    IF cardinality(p_key_ids) IS DISTINCT FROM responses OR cardinality(p_rpcs) IS DISTINCT FROM responses
       OR cardinality(p_trace_ids) IS DISTINCT FROM responses
       OR cardinality(p_response_ends) IS DISTINCT FROM responses
       OR cardinality(p_items_of) IS DISTINCT FROM responses
       OR cardinality(p_items_digests) IS DISTINCT FROM responses
       OR coalesce(p_response_ends[responses], 0) IS DISTINCT FROM items
       OR cardinality(p_appointment_ids) IS DISTINCT FROM items
       OR cardinality(p_requested_ids) IS DISTINCT FROM items
       OR cardinality(p_counted_since) IS DISTINCT FROM partners
       OR cardinality(p_new_patient_ends) IS DISTINCT FROM partners
       OR coalesce(p_new_patient_ends[partners], 0) IS DISTINCT FROM coalesce(cardinality(p_new_patients), 0) THEN
        RAISE EXCEPTION 'record_basic_disclosures: arrays of different lengths';
    END IF;
    -- Each reference's record, looked up by its id alone (never its arrays): the same partner's, of the
    -- same UTC day, with items of its own, a disclosed basic view. A reference has its items digest and
    -- no items of its own.
    IF cardinality(array_remove(p_items_of, NULL)) > 0 THEN
        IF EXISTS (
            SELECT 1
            FROM unnest(p_items_of, p_items_digests, p_response_partners, p_response_ends) WITH ORDINALITY
                 AS r(ref, digest, partner_id, last, n)
            WHERE r.ref IS NOT NULL
              AND (r.digest IS NULL OR r.last > coalesce(p_response_ends[r.n - 1], 0)
                   OR (SELECT o.partner_id = r.partner_id AND o.items_of IS NULL AND o.appointment_ids IS NOT NULL
                              AND o.view = 1 AND o.outcome = 1 AND (o.disclose_time AT TIME ZONE 'UTC')::date = today
                       FROM disclosures o WHERE o.id = r.ref) IS NOT TRUE)
        ) THEN
            RAISE EXCEPTION 'a response refers to a record it cannot repeat' USING ERRCODE = 'AG409';
        END IF;
        refs := array_remove(p_items_of, NULL);
    END IF;
    FOR i IN 1 .. partners LOOP
        SELECT u.counted_since::text::bigint INTO since
        FROM partner_daily_usage u WHERE u.partner_id = p_partners[i] AND u.day = today;
        IF since = p_counted_since[i] THEN
            patients := p_new_patients[coalesce(p_new_patient_ends[i - 1], 0) + 1 : p_new_patient_ends[i]];
        ELSE  -- every patient of the partner's responses, and of the records its references name
            IF partners = 1 AND p_response_partners <@ p_partners THEN  -- every response is this partner's
                patients := p_patient_ids;
                named := refs;
            ELSE
                patients := ARRAY(
                    SELECT p_patient_ids[k]
                    FROM generate_series(1, responses) AS r(n),
                         generate_series(coalesce(p_response_ends[r.n - 1], 0) + 1, p_response_ends[r.n]) AS k
                    WHERE p_response_partners[r.n] = p_partners[i]);
                named := ARRAY(SELECT r.ref FROM unnest(p_items_of, p_response_partners) AS r(ref, partner_id)
                               WHERE r.ref IS NOT NULL AND r.partner_id = p_partners[i]);
            END IF;
            -- By id alone (each was checked above to be the partner's): a condition on partner_id could be
            -- planned as a scan of the partner's whole ledger.
            IF cardinality(named) > 0 THEN
                patients := patients || ARRAY(
                    SELECT unnest(o.patient_ids) FROM disclosures o WHERE o.id = ANY (named));
            END IF;
        END IF;
        IF cardinality(patients) > 0 THEN
            charged := charge_partner_usage(p_partners[i], patients, cardinality(patients), 0, p_contact_caps[i],
                                            p_patient_caps[i], p_anomaly_factors[i], p_anomaly_mins[i],
                                            p_suspends[i]);
        ELSE  -- what charge_partner_usage answers for no patient and no contact (0012), without its call
            charged := 'ok';
        END IF;
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
        outcomes := outcomes || charged;
        sinces := sinces || since;
    END LOOP;
    -- Ids in the order of the responses, so the sequencer chains them in that order as before.
    FOR n IN 1 .. responses LOOP
        ids := ids || CASE
            WHEN (p_items_of[n] IS NOT NULL OR p_response_ends[n] > coalesce(p_response_ends[n - 1], 0))
                 AND p_response_partners[n] <> ALL (suspended)
            THEN nextval('disclosures_id_seq') END;
    END LOOP;
    INSERT INTO disclosures (id, partner_id, key_id, view, contact_fields, consent_id, rpc, trace_id, disclose_time,
                             outcome, denial_reason, requested_ids, appointment_ids, patient_ids, items_of,
                             items_digest)
    SELECT ids[r.n], r.partner_id, r.key_id, 1, '{}', NULL, r.rpc, r.trace_id, statement_timestamp(), 1, '',
           CASE WHEN r.ref IS NULL THEN p_requested_ids[r.first : r.last] END,
           CASE WHEN r.ref IS NULL THEN p_appointment_ids[r.first : r.last] END,
           CASE WHEN r.ref IS NULL THEN p_patient_ids[r.first : r.last] END,
           r.ref, decode(r.digest, 'hex')
    FROM (
        SELECT r.partner_id, r.key_id, r.rpc, r.trace_id, r.ref, r.digest, r.n,
               coalesce(p_response_ends[r.n - 1], 0) + 1 AS first, p_response_ends[r.n] AS last
        FROM unnest(p_response_partners, p_key_ids, p_rpcs, p_trace_ids, p_items_of, p_items_digests)
             WITH ORDINALITY AS r(partner_id, key_id, rpc, trace_id, ref, digest, n)
    ) r
    WHERE ids[r.n] IS NOT NULL
    ORDER BY r.n;
    RETURN QUERY SELECT p.partner_id, p.outcome, p.counted_since, ids
    FROM unnest(p_partners, outcomes, sinces) AS p(partner_id, outcome, counted_since);
END
$$;
