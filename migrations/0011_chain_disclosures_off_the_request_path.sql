-- Take the ledger's chain lock off the request path.
--
-- Until now each response appended its records under the ledger_head row
-- lock, held until its transaction committed: every partner call of every
-- gateway process queued on that one lock (bench: ~170 calls/s at most).
-- Now a response inserts its records set-based, with no lock, in its own
-- transaction: they are durable when it commits, exactly as before. A
-- sequencer (chain_disclosures, run every ~100 ms by one gateway process at a
-- time) then numbers and hash-chains the committed records, in one
-- transaction per batch. A record is tamper-evident from its chaining, a
-- fraction of a second after its commit; `audit verify` chains what is
-- pending before it checks.

ALTER TABLE disclosures DISABLE TRIGGER disclosures_append_only;

-- A record's identity, assigned at insert; seq is now its position in the chain, assigned when chained.
CREATE SEQUENCE disclosures_id_seq;
ALTER TABLE disclosures ADD COLUMN id bigint;
UPDATE disclosures SET id = seq;
SELECT setval('disclosures_id_seq', coalesce((SELECT max(id) FROM disclosures), 0) + 1, false);
ALTER TABLE disclosures ALTER COLUMN id SET DEFAULT nextval('disclosures_id_seq'), ALTER COLUMN id SET NOT NULL;
ALTER SEQUENCE disclosures_id_seq OWNED BY disclosures.id;
-- The inserting transaction: the sequencer chains a record only once every
-- transaction that started before it has ended, so none is ever skipped.
ALTER TABLE disclosures ADD COLUMN txid xid8 NOT NULL DEFAULT pg_current_xact_id();
ALTER TABLE disclosures DROP CONSTRAINT disclosures_pkey;
ALTER TABLE disclosures ADD PRIMARY KEY (id);
ALTER TABLE disclosures ALTER COLUMN seq DROP NOT NULL, ALTER COLUMN prev_hash DROP NOT NULL,
    ALTER COLUMN hash DROP NOT NULL;
CREATE UNIQUE INDEX disclosures_seq_idx ON disclosures (seq);
CREATE INDEX disclosures_unchained_idx ON disclosures (id) WHERE seq IS NULL;

-- Append-only, except for the one write the sequencer makes: setting the chain
-- columns of a record that has none yet, changing nothing else.
DROP TRIGGER disclosures_append_only ON disclosures;
CREATE FUNCTION guard_disclosures() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $$
DECLARE
    unchained disclosures;
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.seq IS NULL AND NEW.seq IS NOT NULL THEN
        unchained := NEW;
        unchained.seq := NULL;
        unchained.prev_hash := NULL;
        unchained.hash := NULL;
        IF unchained IS NOT DISTINCT FROM OLD THEN
            RETURN NEW;
        END IF;
    END IF;
    RAISE EXCEPTION 'the disclosure ledger is append-only' USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER disclosures_append_only BEFORE UPDATE OR DELETE ON disclosures
    FOR EACH ROW EXECUTE FUNCTION guard_disclosures();

-- The request path: one set-based INSERT, no lock.
CREATE OR REPLACE FUNCTION append_disclosures(
    p_partner_id uuid, p_key_id text, p_rpc text, p_trace_id text, p_view smallint, p_outcome smallint,
    p_denial_reason text, p_requested_ids text[], p_appointment_ids uuid[], p_patient_ids uuid[],
    p_contact_fields smallint[], p_consent_id uuid
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
    added bigint;
BEGIN
    IF cardinality(p_appointment_ids) IS DISTINCT FROM cardinality(p_patient_ids)
       OR cardinality(p_appointment_ids) IS DISTINCT FROM cardinality(p_requested_ids) THEN
        RAISE EXCEPTION 'append_disclosures: arrays of different lengths';
    END IF;
    INSERT INTO disclosures (partner_id, key_id, requested_id, appointment_id, patient_id, view, contact_fields,
                             consent_id, rpc, trace_id, disclose_time, outcome, denial_reason)
    SELECT p_partner_id, p_key_id, u.requested_id, u.appointment_id, u.patient_id, p_view,
           coalesce(p_contact_fields, '{}'), p_consent_id, p_rpc, coalesce(p_trace_id, ''), statement_timestamp(),
           p_outcome, coalesce(p_denial_reason, '')
    FROM unnest(p_requested_ids, p_appointment_ids, p_patient_ids) AS u(requested_id, appointment_id, patient_id);
    GET DIAGNOSTICS added = ROW_COUNT;
    RETURN added;
END
$$;

-- The sequencer: chains up to p_limit committed records; returns how many.
-- Concurrent callers are harmless: the first takes the advisory lock, the others return 0.
CREATE FUNCTION chain_disclosures(p_limit integer) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
    head    ledger_head;
    rec     disclosures;
    horizon xid8 := pg_snapshot_xmin(pg_current_snapshot());
    chained integer := 0;
BEGIN
    IF NOT pg_try_advisory_xact_lock(7021700117) THEN
        RETURN 0;
    END IF;
    SELECT * INTO head FROM ledger_head FOR UPDATE;
    FOR rec IN
        SELECT * FROM disclosures WHERE seq IS NULL AND txid < horizon ORDER BY id LIMIT p_limit
    LOOP
        rec.seq := head.seq + 1;
        rec.prev_hash := head.hash;
        rec.hash := disclosure_digest(rec);
        UPDATE disclosures SET seq = rec.seq, prev_hash = rec.prev_hash, hash = rec.hash WHERE id = rec.id;
        head.seq := rec.seq;
        head.hash := rec.hash;
        chained := chained + 1;
    END LOOP;
    IF chained > 0 THEN
        UPDATE ledger_head SET seq = head.seq, hash = head.hash;
    END IF;
    RETURN chained;
END
$$;
REVOKE ALL ON FUNCTION chain_disclosures(integer) FROM PUBLIC;
