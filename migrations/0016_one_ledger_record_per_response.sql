-- One ledger record per response instead of one per appointment.
--
-- A ListAppointments page wrote 50 records: 50 heap rows with five index
-- entries each, then 50 updates by the sequencer, each with a digest and five
-- more index entries. Measured on the bench world (pgbench, 16 clients, 2
-- cores): the record statement of a page ran at 882 statements/s against
-- 3,293 for a one-record response, and the sequencer chained 5,000 records in
-- 0.345 s: 69 µs per record, 3.4 ms per page, more than the whole read. Under
-- load the sequencer fell seconds behind (docs/robustness.md).
--
-- From now on a record holds every appointment of its response, in the
-- response's order, in three parallel arrays: requested_ids (what the partner
-- named or was shown), appointment_ids and patient_ids. What the ledger says
-- does not change: partner, key, view, fields, consent, RPC, trace and time
-- were the same for every record of a response already. Records written
-- before this migration keep their one item in requested_id, appointment_id
-- and patient_id (their arrays are NULL), and their digests do not change:
-- concat_ws skips NULL arguments, so the three array arguments added to
-- disclosure_digest below only count for records that have them.
--
-- Readers that want one row per appointment (the audit API, the breach
-- report, the usage figures) read the disclosure_items view, which unnests
-- both shapes alike.

ALTER TABLE disclosures
    ADD COLUMN requested_ids   text[],
    ADD COLUMN appointment_ids uuid[],
    ADD COLUMN patient_ids     uuid[];
-- A page's arrays (~3 KB) stay in the row: compressed when they compress
-- (ids do not), moved to TOAST only when a row would not fit in a page.
ALTER TABLE disclosures
    ALTER COLUMN requested_ids SET STORAGE MAIN,
    ALTER COLUMN appointment_ids SET STORAGE MAIN,
    ALTER COLUMN patient_ids SET STORAGE MAIN;
-- Either shape, never a mix. NOT VALID: every existing row has NULL arrays and
-- passes; validating would only read the whole ledger to find that out.
ALTER TABLE disclosures ADD CONSTRAINT disclosures_items_check CHECK (
    (appointment_ids IS NULL AND patient_ids IS NULL AND requested_ids IS NULL)
    OR (cardinality(appointment_ids) > 0
        AND cardinality(patient_ids) = cardinality(appointment_ids)
        AND cardinality(requested_ids) = cardinality(appointment_ids)
        AND appointment_id IS NULL AND patient_id IS NULL AND requested_id = '')
) NOT VALID;
-- "Which partners were shown this patient" for records of the new shape (the
-- old shape keeps disclosures_patient_time_idx).
CREATE INDEX disclosures_patient_ids_idx ON disclosures USING gin (patient_ids) WHERE patient_ids IS NOT NULL;

-- The canonical digest: unchanged for records without arrays; the items, in
-- order, for records with them (0x1e between elements, '' for a NULL element).
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
        array_to_string(d.patient_ids, E'\x1e', '')), 'UTF8'))
$$;

-- The request path: one row for the whole response, no lock. Returns the
-- number of appointments recorded (0, and no row, for an empty response).
CREATE OR REPLACE FUNCTION append_disclosures(
    p_partner_id uuid, p_key_id text, p_rpc text, p_trace_id text, p_view smallint, p_outcome smallint,
    p_denial_reason text, p_requested_ids text[], p_appointment_ids uuid[], p_patient_ids uuid[],
    p_contact_fields smallint[], p_consent_id uuid
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
BEGIN
    IF cardinality(p_appointment_ids) IS DISTINCT FROM cardinality(p_patient_ids)
       OR cardinality(p_appointment_ids) IS DISTINCT FROM cardinality(p_requested_ids) THEN
        RAISE EXCEPTION 'append_disclosures: arrays of different lengths';
    END IF;
    IF coalesce(cardinality(p_appointment_ids), 0) = 0 THEN
        RETURN 0;
    END IF;
    INSERT INTO disclosures (partner_id, key_id, view, contact_fields, consent_id, rpc, trace_id, disclose_time,
                             outcome, denial_reason, requested_ids, appointment_ids, patient_ids)
    VALUES (p_partner_id, p_key_id, p_view, coalesce(p_contact_fields, '{}'), p_consent_id, p_rpc,
            coalesce(p_trace_id, ''), statement_timestamp(), p_outcome, coalesce(p_denial_reason, ''),
            p_requested_ids, p_appointment_ids, p_patient_ids);
    RETURN cardinality(p_appointment_ids);
END
$$;

-- One row per appointment of every record, whatever its shape: `item` is the
-- appointment's position in its record (0 for records of the old shape).
CREATE VIEW disclosure_items AS
SELECT d.id, (u.item - 1)::integer AS item, d.seq, d.partner_id, d.key_id, u.requested_id, u.appointment_id,
       u.patient_id, d.view, d.contact_fields, d.consent_id, d.rpc, d.trace_id, d.disclose_time, d.outcome,
       d.denial_reason
FROM disclosures d
CROSS JOIN LATERAL unnest(coalesce(d.requested_ids, ARRAY[d.requested_id]),
                          coalesce(d.appointment_ids, ARRAY[d.appointment_id]),
                          coalesce(d.patient_ids, ARRAY[d.patient_id]))
    WITH ORDINALITY AS u(requested_id, appointment_id, patient_id, item);
REVOKE ALL ON disclosure_items FROM PUBLIC;
