-- The chain in a table of its own: the sequencer inserts a small row instead of rewriting the record.
--
-- Until now the sequencer chained a record by updating its seq, prev_hash and
-- hash in place. A record of a page is ~3.7 KB, and the update was not HOT
-- (seq is indexed): a second copy of the row, a second entry in every index
-- (50 in the GIN index of patients alone), an attempt to compress its arrays
-- (ids do not compress) and ~3.7 KB more WAL. Measured with
-- pg_stat_statements on the bench world (bench/run.py, ListAppointments,
-- c=16, one gateway process, 11,221 calls): the update took 201 µs per
-- record, chaining 310 µs in all, as much as half the read; the record's
-- insert took ~240 µs, of which the compression attempt and two index
-- entries (seq, unchained) that only the sequencer needs.
--
-- From now on:
--
--   * disclosure_chain holds each record's place in the chain: its position
--     (seq), the hash before it and its own hash, keyed by the record's id.
--     The record itself is never written again: disclosures is strictly
--     append-only, as it was before 0011. The digest is unchanged
--     (disclosure_digest of the record with its seq and prev_hash), so
--     chains written before this migration verify as they did.
--   * the sequencer finds unchained records by their inserting transaction:
--     ledger_head remembers the (txid, id) of the last record it examined, and
--     every record after it whose transaction is older than every running
--     one is committed (or never will be), so it takes them in (txid, id)
--     order from an index on exactly that. Nothing needs marking as chained,
--     and no record can be skipped: a transaction still running has a txid at
--     or above the horizon, so its records come after the cursor.
--   * a record of a page stays in its row uncompressed (toast_tuple_target):
--     ids do not compress, and trying cost a pglz pass per insert.
--
-- Records chained before this migration keep their (now historical) chain
-- columns, copied here into disclosure_chain; records not yet chained are
-- chained by the new sequencer on its first pass.

-- No record is written or read while the chain changes hands: every record
-- written before the lock is committed once it is held, and writers wait for
-- the migration, so each record is either chained below or after the cursor.
LOCK TABLE disclosures IN ACCESS EXCLUSIVE MODE;

CREATE TABLE disclosure_chain (
    -- The record chained (disclosures.id).
    id        bigint PRIMARY KEY,
    -- Gapless position in the chain, from 1.
    seq       bigint NOT NULL UNIQUE,
    -- The hash of the record before (32 zero bytes for the first).
    prev_hash bytea NOT NULL,
    -- disclosure_digest of the record at this seq after prev_hash.
    hash      bytea NOT NULL
);
CREATE TRIGGER disclosure_chain_append_only BEFORE UPDATE OR DELETE ON disclosure_chain
    FOR EACH ROW EXECUTE FUNCTION refuse_ledger_change();
CREATE TRIGGER disclosure_chain_no_truncate BEFORE TRUNCATE ON disclosure_chain
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_ledger_change();
REVOKE ALL ON disclosure_chain FROM PUBLIC;

INSERT INTO disclosure_chain (id, seq, prev_hash, hash)
SELECT id, seq, prev_hash, hash FROM disclosures WHERE seq IS NOT NULL;

-- The sequencer's cursor: every record at or before (chained_txid, chained_id) is chained.
-- It starts before the oldest record not chained yet and before any transaction
-- still running; the first pass skips the few chained records after it.
ALTER TABLE ledger_head ADD COLUMN chained_txid xid8, ADD COLUMN chained_id bigint;
UPDATE ledger_head SET
    chained_txid = least(
        (SELECT min(txid) FROM disclosures WHERE seq IS NULL),
        pg_snapshot_xmin(pg_current_snapshot())
    ),
    chained_id = 0;
ALTER TABLE ledger_head ALTER COLUMN chained_txid SET NOT NULL, ALTER COLUMN chained_id SET NOT NULL;

-- Strictly append-only again: no write to a record after its insert, not even the sequencer's.
DROP TRIGGER disclosures_append_only ON disclosures;
CREATE TRIGGER disclosures_append_only BEFORE UPDATE OR DELETE ON disclosures
    FOR EACH ROW EXECUTE FUNCTION refuse_ledger_change();
DROP FUNCTION guard_disclosures();

-- The sequencer's index replaces the two that only existed for the in-place update.
CREATE INDEX disclosures_txid_idx ON disclosures (txid, id);
DROP INDEX disclosures_unchained_idx;
DROP INDEX disclosures_seq_idx;

-- A row up to a page's size stays whole and uncompressed.
ALTER TABLE disclosures SET (toast_tuple_target = 8160);

-- The digest of a record at a given place in the chain: disclosure_digest, the one
-- definition, of the record with that seq and prev_hash. NULL for a NULL record.
CREATE FUNCTION disclosure_digest(d disclosures, p_seq bigint, p_prev_hash bytea) RETURNS bytea
LANGUAGE plpgsql IMMUTABLE STRICT
SET search_path = pg_catalog, public
AS $$
BEGIN
    d.seq := p_seq;
    d.prev_hash := p_prev_hash;
    RETURN disclosure_digest(d);
END
$$;

-- The sequencer: chains up to p_limit committed records, in (txid, id) order,
-- and returns how many records it examined (0 when there is nothing to chain).
-- Concurrent callers are harmless: the first takes the advisory lock, the others return 0.
CREATE OR REPLACE FUNCTION chain_disclosures(p_limit integer) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public
SET enable_sort = off
SET enable_bitmapscan = off
AS $$
DECLARE
    head      ledger_head;
    rec       disclosures;
    horizon   xid8 := pg_snapshot_xmin(pg_current_snapshot());
    examined  integer := 0;
    chained   integer := 0;
    ids       bigint[] := '{}';
    seqs      bigint[] := '{}';
    prevs     bytea[] := '{}';
    hashes    bytea[] := '{}';
BEGIN
    IF NOT pg_try_advisory_xact_lock(7021700117) THEN
        RETURN 0;
    END IF;
    SELECT * INTO head FROM ledger_head FOR UPDATE;
    FOR rec IN
        SELECT * FROM disclosures d
        WHERE (d.txid, d.id) > (head.chained_txid, head.chained_id) AND d.txid < horizon
        ORDER BY d.txid, d.id
        LIMIT p_limit
    LOOP
        examined := examined + 1;
        head.chained_txid := rec.txid;
        head.chained_id := rec.id;
        -- Only records chained before 0018 can be found here already chained.
        CONTINUE WHEN EXISTS (SELECT 1 FROM disclosure_chain c WHERE c.id = rec.id);
        chained := chained + 1;
        ids[chained] := rec.id;
        seqs[chained] := head.seq + 1;
        prevs[chained] := head.hash;
        hashes[chained] := disclosure_digest(rec, head.seq + 1, head.hash);
        head.seq := head.seq + 1;
        head.hash := hashes[chained];
    END LOOP;
    IF examined > 0 THEN
        INSERT INTO disclosure_chain (id, seq, prev_hash, hash) SELECT * FROM unnest(ids, seqs, prevs, hashes);
        UPDATE ledger_head SET seq = head.seq, hash = head.hash, chained_txid = head.chained_txid,
            chained_id = head.chained_id;
    END IF;
    RETURN examined;
END
$$;
REVOKE ALL ON FUNCTION chain_disclosures(integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION disclosure_digest(disclosures, bigint, bytea) FROM PUBLIC;

-- The view's seq is the record's position in the chain, wherever it is kept.
CREATE OR REPLACE VIEW disclosure_items AS
SELECT d.id, (u.item - 1)::integer AS item, c.seq, d.partner_id, d.key_id, u.requested_id, u.appointment_id,
       u.patient_id, d.view, d.contact_fields, d.consent_id, d.rpc, d.trace_id, d.disclose_time, d.outcome,
       d.denial_reason
FROM disclosures d
LEFT JOIN disclosure_chain c ON c.id = d.id
CROSS JOIN LATERAL unnest(coalesce(d.requested_ids, ARRAY[d.requested_id]),
                          coalesce(d.appointment_ids, ARRAY[d.appointment_id]),
                          coalesce(d.patient_ids, ARRAY[d.patient_id]))
    WITH ORDINALITY AS u(requested_id, appointment_id, patient_id, item);
