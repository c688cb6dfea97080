-- The disclosure audit trail: one record per appointment disclosed to (or
-- refused to) a partner. Append-only and hash-chained: each record stores the
-- hash of the previous one and its own hash over both, so an altered, deleted
-- or reordered record breaks the chain (`python -m service audit verify`).

CREATE TABLE disclosures (
    -- Gapless position in the chain, assigned under the ledger_head lock.
    seq            bigint PRIMARY KEY,
    partner_id     uuid NOT NULL,
    key_id         text NOT NULL,
    -- The appointment id as the partner sent it (its partner-scoped pseudonym),
    -- kept for refused probes that resolved to no appointment.
    requested_id   text NOT NULL DEFAULT '',
    appointment_id uuid,
    patient_id     uuid,
    -- 1 = basic view, 2 = contact view (appointments.internal.v1.DisclosureView).
    view           smallint NOT NULL CHECK (view IN (1, 2)),
    -- appointments.type.v1.ContactField numbers disclosed; empty in the basic view.
    contact_fields smallint[] NOT NULL DEFAULT '{}',
    consent_id     uuid,
    rpc            text NOT NULL,
    trace_id       text NOT NULL DEFAULT '',
    disclose_time  timestamptz NOT NULL,
    -- 1 = disclosed, 2 = denied (appointments.internal.v1.DisclosureOutcome).
    outcome        smallint NOT NULL CHECK (outcome IN (1, 2)),
    denial_reason  text NOT NULL DEFAULT '',
    prev_hash      bytea NOT NULL,
    hash           bytea NOT NULL
);
CREATE INDEX disclosures_partner_time_idx ON disclosures (partner_id, disclose_time);
CREATE INDEX disclosures_patient_time_idx ON disclosures (patient_id, disclose_time) WHERE patient_id IS NOT NULL;
CREATE INDEX disclosures_time_idx ON disclosures (disclose_time);

-- The end of the chain: one row, locked by each append until its transaction ends.
CREATE TABLE ledger_head (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    seq       bigint NOT NULL,
    hash      bytea NOT NULL
);
INSERT INTO ledger_head (seq, hash) VALUES (0, '\x0000000000000000000000000000000000000000000000000000000000000000');

-- Signed checkpoints of the chain. The chain alone can be recomputed by whoever
-- can write the table; a seal carries an HMAC under a key the database never
-- sees, so history before the last seal cannot be rewritten unnoticed.
CREATE TABLE ledger_seals (
    seq         bigint PRIMARY KEY,
    hash        bytea NOT NULL,
    seal_time   timestamptz NOT NULL DEFAULT now(),
    signature   bytea NOT NULL
);

-- The canonical digest of a record: the one definition used by append and verify.
CREATE FUNCTION disclosure_digest(d disclosures) RETURNS bytea
LANGUAGE sql IMMUTABLE STRICT
SET search_path = pg_catalog, public
AS $$
    SELECT sha256(d.prev_hash || convert_to(concat_ws(E'\x1f',
        d.seq::text, d.partner_id::text, d.key_id, d.requested_id,
        coalesce(d.appointment_id::text, ''), coalesce(d.patient_id::text, ''),
        d.view::text, array_to_string(d.contact_fields, ','), coalesce(d.consent_id::text, ''),
        d.rpc, d.trace_id, to_char(d.disclose_time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        d.outcome::text, d.denial_reason), 'UTF8'))
$$;

-- Appends one record per element of the parallel arrays, in one statement.
CREATE FUNCTION append_disclosures(
    p_partner_id uuid, p_key_id text, p_rpc text, p_trace_id text, p_view smallint, p_outcome smallint,
    p_denial_reason text, p_requested_ids text[], p_appointment_ids uuid[], p_patient_ids uuid[],
    p_contact_fields smallint[], p_consent_id uuid
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
    head ledger_head;
    rec  disclosures;
    at   timestamptz := statement_timestamp();
BEGIN
    IF cardinality(p_appointment_ids) IS DISTINCT FROM cardinality(p_patient_ids)
       OR cardinality(p_appointment_ids) IS DISTINCT FROM cardinality(p_requested_ids) THEN
        RAISE EXCEPTION 'append_disclosures: arrays of different lengths';
    END IF;
    SELECT * INTO head FROM ledger_head FOR UPDATE;
    FOR i IN 1 .. coalesce(cardinality(p_appointment_ids), 0) LOOP
        rec := ROW(head.seq + 1, p_partner_id, p_key_id, p_requested_ids[i], p_appointment_ids[i], p_patient_ids[i],
                   p_view, coalesce(p_contact_fields, '{}'), p_consent_id, p_rpc, coalesce(p_trace_id, ''), at,
                   p_outcome, coalesce(p_denial_reason, ''), head.hash, NULL);
        rec.hash := disclosure_digest(rec);
        INSERT INTO disclosures SELECT rec.*;
        head.seq := rec.seq;
        head.hash := rec.hash;
    END LOOP;
    UPDATE ledger_head SET seq = head.seq, hash = head.hash;
    RETURN head.seq;
END
$$;

-- Nobody edits the ledger: not the service, not an owner by mistake.
CREATE FUNCTION refuse_ledger_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the disclosure ledger is append-only' USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER disclosures_append_only BEFORE UPDATE OR DELETE ON disclosures
    FOR EACH ROW EXECUTE FUNCTION refuse_ledger_change();
CREATE TRIGGER disclosures_no_truncate BEFORE TRUNCATE ON disclosures
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_ledger_change();
CREATE TRIGGER ledger_seals_append_only BEFORE UPDATE OR DELETE ON ledger_seals
    FOR EACH ROW EXECUTE FUNCTION refuse_ledger_change();
