-- A response that repeats one already recorded is recorded by reference to it.
--
-- Agenda tools list the same pages all day: the same partner, the same
-- appointments, the same patients, call after call. Each listing wrote a
-- record of ~3.7 KB holding its 50 requested ids, appointment ids and patient
-- ids, with 50 entries in the GIN index of patients, and the sequencer
-- digested the text of all 150 ids. Measured on the bench world, that record
-- was the whole gap between the gateway's listing and the naive handler's
-- (docs/performance.md: with the record patched out, 1.07x naive; with it,
-- 0.80x).
--
-- From now on a record may hold no items of its own and name instead the
-- record whose items its response disclosed again (items_of), with the
-- SHA-256 of those items (items_digest, disclosure_items_digest below). It
-- keeps everything that makes it a disclosure of its own: partner, key, RPC,
-- trace id and time. What the ledger says does not change: the
-- disclosure_items view gives a reference record the items of the record it
-- names, so the audit API, the breach report and the usage figures read both
-- alike.
--
-- The gateway decides a response repeats an earlier one from its own memo of
-- the records it wrote (service/store/repeats.py), keyed by the exact items;
-- it writes the items themselves in the first place, so the ledger takes its
-- word for which items were shown, as it always has. The database checks
-- what it can cheaply on the request path: the record named exists, is the
-- same partner's, is of the same UTC day (so of the same monthly partition,
-- and a day's breach report needs no other day's records), holds items of its
-- own (a reference never names a reference) and is a disclosed basic view.
-- Otherwise the statement fails with SQLSTATE AG409, and the gateway forgets
-- its memo and writes the responses in full: so does the first group after
-- midnight that names a record of the day before. The gateway also gives the
-- SHA-256 of the items it claims repeated (disclosure_items_digest below,
-- computed on its side from the same text), which the reference's own digest
-- covers. audit verify recomputes it from the record named: a memo that named
-- the wrong record, or ids swapped between records (ids are not part of any
-- digest), would show there.

-- Chains written before this migration verify as they did: disclosure_digest
-- appends the two new columns only when they are set (concat_ws skips NULL).

ALTER TABLE disclosures
    ADD COLUMN items_of     bigint,
    ADD COLUMN items_digest bytea;
-- A reference record holds no items of its own, and always both columns. NOT
-- VALID: every existing row has both columns NULL and passes; validating would
-- only read the whole ledger to find that out.
ALTER TABLE disclosures ADD CONSTRAINT disclosures_items_of_check CHECK (
    (items_of IS NULL AND items_digest IS NULL)
    OR (items_of IS NOT NULL AND items_digest IS NOT NULL
        AND requested_ids IS NULL AND appointment_ids IS NULL AND patient_ids IS NULL
        AND requested_id = '' AND appointment_id IS NULL AND patient_id IS NULL)
) NOT VALID;
-- "Which records repeat this one": the patient lookups go from a record to its references.
CREATE INDEX disclosures_items_of_idx ON disclosures (items_of) WHERE items_of IS NOT NULL;

-- The SHA-256 of a record's own items: the text of its requested ids, then of
-- its appointment ids, then of its patient ids, elements joined by 0x1e and
-- arrays by 0x1f, as disclosure_digest renders them (service/store/repeats.py
-- computes the same from a response). NULL for a record without arrays. Only
-- audit verify calls it.
CREATE FUNCTION disclosure_items_digest(d disclosures) RETURNS bytea
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, public
AS $$
    SELECT sha256(convert_to(array_to_string(d.requested_ids, E'\x1e', '') || E'\x1f'
                             || array_to_string(d.appointment_ids, E'\x1e', '') || E'\x1f'
                             || array_to_string(d.patient_ids, E'\x1e', ''), 'UTF8'))
$$;
REVOKE ALL ON FUNCTION disclosure_items_digest(disclosures) FROM PUBLIC;

-- The canonical digest: 0016's, then the reference and its items digest when set.
CREATE OR REPLACE FUNCTION disclosure_digest(d disclosures) RETURNS bytea
LANGUAGE sql IMMUTABLE STRICT
SET search_path = pg_catalog, public
AS $$
    SELECT sha256(d.prev_hash || convert_to(concat_ws(E'\x1f',
        d.seq::text, d.partner_id::text, d.key_id, d.requested_id,
        coalesce(d.appointment_id::text, ''), coalesce(d.patient_id::text, ''),
        d.view::text, array_to_string(d.contact_fields, ','), coalesce(d.consent_id::text, ''),
        d.rpc, d.trace_id, to_char(d.disclose_time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        d.outcome::text, d.denial_reason,
        array_to_string(d.requested_ids, E'\x1e', ''), array_to_string(d.appointment_ids, E'\x1e', ''),
        array_to_string(d.patient_ids, E'\x1e', ''),
        'items_of=' || d.items_of::text, 'items_digest=' || encode(d.items_digest, 'hex')), 'UTF8'))
$$;

-- A reference record reads as the items of the record it names, with its own id, time and trace.
-- The record named is looked up record by record (OFFSET 0 keeps the lookup from being planned as a
-- join, which could hash the whole ledger); a record with no reference costs one probe that finds nothing.
CREATE OR REPLACE VIEW disclosure_items AS
SELECT d.id, (u.item - 1)::integer AS item, c.seq, d.partner_id, d.key_id, u.requested_id, u.appointment_id,
       u.patient_id, d.view, d.contact_fields, d.consent_id, d.rpc, d.trace_id, d.disclose_time, d.outcome,
       d.denial_reason
FROM disclosures d
LEFT JOIN disclosure_chain c ON c.id = d.id
LEFT JOIN LATERAL (
    SELECT o.requested_ids, o.appointment_ids, o.patient_ids FROM disclosures o WHERE o.id = d.items_of OFFSET 0
) o ON true
CROSS JOIN LATERAL unnest(coalesce(d.requested_ids, o.requested_ids, ARRAY[d.requested_id]),
                          coalesce(d.appointment_ids, o.appointment_ids, ARRAY[d.appointment_id]),
                          coalesce(d.patient_ids, o.patient_ids, ARRAY[d.patient_id]))
    WITH ORDINALITY AS u(requested_id, appointment_id, patient_id, item);

-- record_basic_disclosures (0020) with two more arguments per response: the
-- record it repeats (p_items_of[n], NULL for a response written in full, whose
-- slice of the item arrays is then its items; a reference has an empty slice)
-- and the hex SHA-256 of the items repeated (p_items_digests[n]).
-- Patients of a reference are those of the record it names: counted already
-- when the caller's counter row stands (the gateway only refers to records
-- written under the row it sends), charged with the others when it does not.
-- Returns, besides each charged partner's outcome and counted_since, the id of
-- each response's record in the order given (NULL for a response without one:
-- no items, or its partner suspended), the same array in every row.
--
-- enable_seqscan is off inside it: the function's statements are planned once
-- per connection and the plans kept, and on a ledger that starts empty (a new
-- database, a new partition) and is analysed while it holds a few rows, its
-- lookups of records by id were planned as sequential scans, which then grew
-- with the ledger (the soak's PostgreSQL CPU per call doubled in four minutes;
-- docs/robustness.md). Every lookup here has its index.
CREATE FUNCTION record_basic_disclosures(
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
-- The gateway calls it on its own (owner) path; the partner role cannot.
REVOKE ALL ON FUNCTION record_basic_disclosures(uuid[], text[], text[], text[], integer[], bigint[], text[], text[],
    uuid[], uuid[], uuid[], integer[], integer[], double precision[], bigint[], boolean[], bigint[], integer[], uuid[])
    FROM PUBLIC;
