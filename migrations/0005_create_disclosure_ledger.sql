-- The disclosure ledger: one record per partner response that revealed appointment data,
-- and per refused attempt, written before the response is sent; then hash-chained.
--
-- Writers append records without a lock, in the transaction of their response: the record
-- statements below take the responses of concurrent calls together (one statement, one
-- commit), count them against the partner's limits (0004) and return what the gateway may
-- send. A sequencer (chain_disclosures, run by one gateway process at a time) then numbers
-- and hash-chains the committed records, a fraction of a second later, into
-- disclosure_chain. Nothing is ever updated or deleted: triggers refuse it. `python -m
-- service audit verify` recomputes every digest, and seals the head with an HMAC under a key
-- the database never sees (ledger_seals).
--
-- A record holds its response's appointments in order, in three parallel arrays (what the
-- partner named or was shown, the appointment, its patient), or, for a response that
-- repeats one recorded earlier the same day (an agenda page listed again), the id of the
-- record holding those items and their SHA-256. disclosure_items reads both shapes as one
-- row per appointment.

CREATE TABLE disclosures (
    id              bigserial PRIMARY KEY,
    partner_id      uuid NOT NULL,
    key_id          text NOT NULL,
    -- appointments.internal.v1.DisclosureView: 1 basic view, 2 contact view.
    view            smallint NOT NULL CHECK (view IN (1, 2)),
    -- appointments.type.v1.ContactField numbers disclosed; empty in the basic view.
    contact_fields  smallint[] NOT NULL DEFAULT '{}',
    consent_id      uuid,
    -- The full gRPC method name.
    rpc             text NOT NULL,
    -- The W3C trace id of the call ('' when it was not traced).
    trace_id        text NOT NULL DEFAULT '',
    -- The hex SHA-256 of the client certificate the call came with (mutual TLS; '' without).
    client_cert     text NOT NULL DEFAULT '',
    -- When it was written: the statement's start by the database's clock, stamped by a
    -- trigger (stamp_disclosure) whatever the insert says.
    disclose_time   timestamptz NOT NULL,
    -- appointments.internal.v1.DisclosureOutcome: 1 disclosed, 2 denied.
    outcome         smallint NOT NULL CHECK (outcome IN (1, 2)),
    -- The ErrorInfo reason of a denial ('' for a disclosure).
    denial_reason   text NOT NULL DEFAULT '',
    -- The response's items: the ids as the partner named or was shown them, the internal
    -- appointment ids and patient ids (NULL elements for a probe that matched nothing).
    requested_ids   text[],
    appointment_ids uuid[],
    patient_ids     uuid[],
    -- A reference: the record whose items this response repeated, and their SHA-256
    -- (disclosure_items_digest), which this record's own digest covers.
    items_of        bigint,
    items_digest    bytea,
    -- The inserting transaction, stamped like the time: the sequencer chains a record once
    -- every transaction that started before it has ended, so it never skips one still running.
    txid            xid8 NOT NULL DEFAULT pg_current_xact_id(),
    -- The shapes a record has, and no other: a key id and a method name as the gateway writes
    -- them; a refusal, and only a refusal, with its reason; contact fields and a consent only in
    -- a contact view, whose disclosure always names its consent; items of its own, or a
    -- reference, never both, never neither.
    CONSTRAINT disclosures_key_check CHECK (key_id ~ '^pk_[a-z2-7]{16}$'),
    CONSTRAINT disclosures_rpc_check CHECK (rpc ~ '^/[A-Za-z0-9_.]+/[A-Za-z0-9_]+$'),
    CONSTRAINT disclosures_trace_check CHECK (trace_id ~ '^([0-9a-f]{32})?$'),
    CONSTRAINT disclosures_client_cert_check CHECK (client_cert ~ '^([0-9a-f]{64})?$'),
    CONSTRAINT disclosures_refusal_check CHECK ((outcome = 1) = (denial_reason = '')),
    CONSTRAINT disclosures_contact_check CHECK (
        (view = 1 AND contact_fields = '{}' AND consent_id IS NULL)
        OR (view = 2 AND (outcome = 2 OR consent_id IS NOT NULL))
    ),
    CONSTRAINT disclosures_items_check CHECK (
        (items_of IS NULL AND items_digest IS NULL
         AND cardinality(appointment_ids) > 0
         AND cardinality(patient_ids) = cardinality(appointment_ids)
         AND cardinality(requested_ids) = cardinality(appointment_ids))
        OR (items_of IS NOT NULL AND items_digest IS NOT NULL
            AND requested_ids IS NULL AND appointment_ids IS NULL AND patient_ids IS NULL)
    )
);
-- A page's arrays stay in its row, uncompressed: ids do not compress, and trying costs a pass.
ALTER TABLE disclosures
    ALTER COLUMN requested_ids SET STORAGE MAIN,
    ALTER COLUMN appointment_ids SET STORAGE MAIN,
    ALTER COLUMN patient_ids SET STORAGE MAIN;
ALTER TABLE disclosures SET (toast_tuple_target = 8160);
CREATE INDEX disclosures_partner_time_idx ON disclosures (partner_id, disclose_time);
CREATE INDEX disclosures_time_idx ON disclosures (disclose_time);
-- "Which partners were shown this patient", then "which records repeat those".
CREATE INDEX disclosures_patient_ids_idx ON disclosures USING gin (patient_ids) WHERE patient_ids IS NOT NULL;
CREATE INDEX disclosures_items_of_idx ON disclosures (items_of) WHERE items_of IS NOT NULL;
-- The sequencer's cursor order.
CREATE INDEX disclosures_txid_idx ON disclosures (txid, id);

-- Each record's place in the chain. The record itself is never written again.
CREATE TABLE disclosure_chain (
    -- The record chained (disclosures.id).
    id         bigint PRIMARY KEY,
    -- Gapless position in the chain, from 1.
    seq        bigint NOT NULL UNIQUE,
    -- The hash of the record before (32 zero bytes for the first).
    prev_hash  bytea NOT NULL,
    -- When the sequencer chained it (the database's clock), which the hash covers: a record
    -- dated long before it was chained was written back-dated.
    chain_time timestamptz NOT NULL,
    -- disclosure_digest of the record at this place.
    hash       bytea NOT NULL
);

-- The end of the chain, and the sequencer's cursor: every record at or before
-- (chained_txid, chained_id) is chained.
CREATE TABLE ledger_head (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    seq          bigint NOT NULL,
    hash         bytea NOT NULL,
    chained_txid xid8 NOT NULL,
    chained_id   bigint NOT NULL
);
INSERT INTO ledger_head (seq, hash, chained_txid, chained_id)
VALUES (0, '\x0000000000000000000000000000000000000000000000000000000000000000', '0', 0);

-- Signed checkpoints of the chain: an HMAC of the head under a key the database never sees,
-- so history before the last seal cannot be rewritten unnoticed by whoever can write the tables.
CREATE TABLE ledger_seals (
    seq         bigint PRIMARY KEY,
    hash        bytea NOT NULL,
    seal_time   timestamptz NOT NULL DEFAULT now(),
    signature   bytea NOT NULL
);

-- Nobody edits the ledger: not the gateway, not an owner by mistake.
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
CREATE TRIGGER disclosure_chain_append_only BEFORE UPDATE OR DELETE ON disclosure_chain
    FOR EACH ROW EXECUTE FUNCTION refuse_ledger_change();
CREATE TRIGGER disclosure_chain_no_truncate BEFORE TRUNCATE ON disclosure_chain
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_ledger_change();
CREATE TRIGGER ledger_seals_append_only BEFORE UPDATE OR DELETE ON ledger_seals
    FOR EACH ROW EXECUTE FUNCTION refuse_ledger_change();
CREATE TRIGGER ledger_seals_no_truncate BEFORE TRUNCATE ON ledger_seals
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_ledger_change();

-- The head only moves forward: its position and the sequencer's cursor never go back, and it
-- is never deleted.
CREATE FUNCTION guard_ledger_head() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.singleton AND NEW.seq >= OLD.seq
       AND (NEW.chained_txid, NEW.chained_id) >= (OLD.chained_txid, OLD.chained_id)
       AND (NEW.seq > OLD.seq OR NEW.hash = OLD.hash) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'the ledger head only moves forward' USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER ledger_head_forward_only BEFORE UPDATE OR DELETE ON ledger_head
    FOR EACH ROW EXECUTE FUNCTION guard_ledger_head();
CREATE TRIGGER ledger_head_no_truncate BEFORE TRUNCATE ON ledger_head
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_ledger_change();

-- A record's time and transaction are the database's, whoever inserts it.
CREATE FUNCTION stamp_disclosure() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.disclose_time := statement_timestamp();
    NEW.txid := pg_current_xact_id();
    RETURN NEW;
END
$$;
CREATE TRIGGER disclosures_stamped BEFORE INSERT ON disclosures
    FOR EACH ROW EXECUTE FUNCTION stamp_disclosure();

-- One field of the digest's canonical encoding: NULL as '-'; a value as its length in
-- characters, ':' and the value. Every field is prefixed by its length, so no field's text can
-- pass for another's, and NULL is not the empty text. Arrays are their PostgreSQL text form,
-- which tells a NULL element from the text 'NULL' and quotes what needs quoting.
CREATE FUNCTION ledger_field(p_text text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT COALESCE(
        pg_catalog.length(p_text)::pg_catalog.text OPERATOR(pg_catalog.||) ':' OPERATOR(pg_catalog.||) p_text, '-')
$$;
REVOKE ALL ON FUNCTION ledger_field(text) FROM PUBLIC;

-- The digest of a record at a place in the chain: the one definition, used by the sequencer
-- and by verification (bench/datagen.py computes the same in Python). The SHA-256 of the hash
-- before it, then, as UTF-8, a domain tag and every field of the record, its position and when
-- it was chained, each encoded by ledger_field, in a fixed order. PL/pgSQL so that each field's
-- text is computed once.
CREATE FUNCTION disclosure_digest(d disclosures, p_seq bigint, p_prev_hash bytea, p_chain_time timestamptz)
RETURNS bytea
LANGUAGE plpgsql STABLE STRICT
SET search_path = pg_catalog, public
AS $$
DECLARE
    fields  text[] := ARRAY[
        p_seq::text, d.id::text, d.txid::text, d.partner_id::text, d.key_id, d.view::text, d.contact_fields::text,
        d.consent_id::text, d.rpc, d.trace_id, d.client_cert,
        to_char(d.disclose_time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), d.outcome::text,
        d.denial_reason, d.requested_ids::text, d.appointment_ids::text, d.patient_ids::text, d.items_of::text,
        encode(d.items_digest, 'hex'), to_char(p_chain_time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')];
    encoded text := 'apptgate-ledger-v1';
    field   text;
BEGIN
    FOREACH field IN ARRAY fields LOOP
        encoded := encoded || ledger_field(field);
    END LOOP;
    RETURN sha256(p_prev_hash || convert_to(encoded, 'UTF8'));
END
$$;
REVOKE ALL ON FUNCTION disclosure_digest(disclosures, bigint, bytea, timestamptz) FROM PUBLIC;

-- The SHA-256 of a record's own items: its requested ids, appointment ids and patient ids,
-- elements joined by 0x1e and arrays by 0x1f (service/disclosure/record.py computes the same
-- from a response). What a reference to the record holds; verification recomputes it.
CREATE FUNCTION disclosure_items_digest(d disclosures) RETURNS bytea
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, public
AS $$
    SELECT sha256(convert_to(array_to_string(d.requested_ids, E'\x1e', '') || E'\x1f'
                             || array_to_string(d.appointment_ids, E'\x1e', '') || E'\x1f'
                             || array_to_string(d.patient_ids, E'\x1e', ''), 'UTF8'))
$$;
REVOKE ALL ON FUNCTION disclosure_items_digest(disclosures) FROM PUBLIC;

-- One row per appointment of every record, `item` its position in the record; a reference
-- reads as the items of the record it names, with its own id, time and trace. The record
-- named is looked up record by record (OFFSET 0 keeps the planner from hashing the whole
-- ledger for a join).
CREATE VIEW disclosure_items AS
SELECT d.id, (u.item - 1)::integer AS item, c.seq, d.partner_id, d.key_id, u.requested_id, u.appointment_id,
       u.patient_id, d.view, d.contact_fields, d.consent_id, d.rpc, d.trace_id, d.disclose_time, d.outcome,
       d.denial_reason, d.client_cert
FROM disclosures d
LEFT JOIN disclosure_chain c ON c.id = d.id
LEFT JOIN LATERAL (
    SELECT o.requested_ids, o.appointment_ids, o.patient_ids FROM disclosures o WHERE o.id = d.items_of OFFSET 0
) o ON true
CROSS JOIN LATERAL unnest(coalesce(d.requested_ids, o.requested_ids),
                          coalesce(d.appointment_ids, o.appointment_ids),
                          coalesce(d.patient_ids, o.patient_ids))
    WITH ORDINALITY AS u(requested_id, appointment_id, patient_id, item);

-- The basic-view responses (ListAppointments, GetAppointment, the change feed) of concurrent
-- calls, charged and recorded in one statement.
--
-- Each partner in p_partners is charged once for all its responses, partners in the order
-- given (sorted by the caller, so concurrent statements lock counters in one order). Over a
-- daily cap the whole statement fails with SQLSTATE AG429, the cap in DETAIL and the partner
-- in HINT, and nothing is counted or recorded: the gateway writes the group again without
-- that partner and that partner's calls one by one, so a cap stays exact. A partner suspended
-- by its charge has nothing recorded.
--
-- The gateway sends per partner only the patients its memo does not know counted, with the
-- counter row they were counted under (counted_since); when the partner's row for the day is
-- another (a new day, counters started over) every patient is charged. A response may be a
-- reference (p_items_of) to a record of the same partner, UTC day, items of its own, and a
-- disclosed basic view; anything else fails with AG409 and the gateway writes it in full.
--
-- Returns one row per charged partner: its outcome and counter row, and every response's
-- record id in the order given (NULL for a response without one), the same array in each row.
--
-- enable_seqscan is off inside it: its plans are made once per connection and kept, and on a
-- ledger analysed while nearly empty its lookups by id were planned as sequential scans that
-- then grew with the ledger. Every lookup here has its index.
CREATE FUNCTION record_basic_disclosures(
    -- One element per response; p_response_ends[n] is the position of response n's last item.
    p_response_partners uuid[], p_key_ids text[], p_rpcs text[], p_trace_ids text[], p_response_ends integer[],
    -- Per response: the record it repeats (NULL: written in full) and the hex SHA-256 of its items.
    p_items_of bigint[], p_items_digests text[],
    -- One element per item, the responses' items one after the other.
    p_requested_ids text[], p_appointment_ids uuid[], p_patient_ids uuid[],
    -- One element per partner to charge, and its terms.
    p_partners uuid[], p_contact_caps integer[], p_patient_caps integer[], p_anomaly_factors double precision[],
    p_anomaly_mins bigint[], p_suspends boolean[],
    -- Per partner: the counter row the caller knows some patients counted under (or NULL), and
    -- the patients to charge anyway, slices of p_new_patients ending at p_new_patient_ends[i].
    p_counted_since bigint[], p_new_patient_ends integer[], p_new_patients uuid[],
    -- Per response: the hex SHA-256 of the client certificate its call came with ('' without).
    p_client_certs text[]
) RETURNS TABLE (partner_id uuid, outcome charge_outcome, counted_since bigint, record_ids bigint[])
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
    outcomes  charge_outcome[] := '{}';
    sinces    bigint[] := '{}';
    ids       bigint[] := '{}';
    refs      bigint[] := '{}';
    named     bigint[];
    patients  uuid[];
    charged   charge_outcome;
    since     bigint;
BEGIN
    IF cardinality(p_key_ids) IS DISTINCT FROM responses OR cardinality(p_rpcs) IS DISTINCT FROM responses
       OR cardinality(p_trace_ids) IS DISTINCT FROM responses
       OR cardinality(p_client_certs) IS DISTINCT FROM responses
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
    -- Each reference's record, looked up by its id alone (never its arrays). A reference has
    -- its items digest and no items of its own.
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
            -- By id alone (each was checked above to be the partner's): a condition on
            -- partner_id could be planned as a scan of the partner's whole ledger.
            IF cardinality(named) > 0 THEN
                patients := patients || ARRAY(
                    SELECT unnest(o.patient_ids) FROM disclosures o WHERE o.id = ANY (named));
            END IF;
        END IF;
        IF cardinality(patients) > 0 THEN
            charged := charge_partner_usage(p_partners[i], patients, 0, p_contact_caps[i], p_patient_caps[i],
                                            p_anomaly_factors[i], p_anomaly_mins[i], p_suspends[i]);
        ELSE  -- what the charge answers for no patient and no contact, without its call
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
    -- Ids in the order of the responses, so the sequencer chains them in that order.
    FOR n IN 1 .. responses LOOP
        ids := ids || CASE
            WHEN (p_items_of[n] IS NOT NULL OR p_response_ends[n] > coalesce(p_response_ends[n - 1], 0))
                 AND p_response_partners[n] <> ALL (suspended)
            THEN nextval('disclosures_id_seq') END;
    END LOOP;
    INSERT INTO disclosures (id, partner_id, key_id, view, contact_fields, consent_id, rpc, trace_id, client_cert,
                             outcome, denial_reason, requested_ids, appointment_ids, patient_ids, items_of,
                             items_digest)
    SELECT ids[r.n], r.partner_id, r.key_id, 1, '{}', NULL, r.rpc, r.trace_id, r.client_cert, 1, '',
           CASE WHEN r.ref IS NULL THEN p_requested_ids[r.first : r.last] END,
           CASE WHEN r.ref IS NULL THEN p_appointment_ids[r.first : r.last] END,
           CASE WHEN r.ref IS NULL THEN p_patient_ids[r.first : r.last] END,
           r.ref, decode(r.digest, 'hex')
    FROM (
        SELECT r.partner_id, r.key_id, r.rpc, r.trace_id, r.client_cert, r.ref, r.digest, r.n,
               coalesce(p_response_ends[r.n - 1], 0) + 1 AS first, p_response_ends[r.n] AS last
        FROM unnest(p_response_partners, p_key_ids, p_rpcs, p_trace_ids, p_client_certs, p_items_of,
                    p_items_digests)
             WITH ORDINALITY AS r(partner_id, key_id, rpc, trace_id, client_cert, ref, digest, n)
    ) r
    WHERE ids[r.n] IS NOT NULL
    ORDER BY r.n;
    RETURN QUERY SELECT p.partner_id, p.outcome, p.counted_since, ids
    FROM unnest(p_partners, outcomes, sinces) AS p(partner_id, outcome, counted_since);
END
$$;
REVOKE ALL ON FUNCTION record_basic_disclosures(uuid[], text[], text[], text[], integer[], bigint[], text[], text[],
    uuid[], uuid[], uuid[], integer[], integer[], double precision[], bigint[], boolean[], bigint[], integer[], uuid[],
    text[])
    FROM PUBLIC;

-- What one contact call is answered: its consent's state; when live, its charge's outcome
-- and the values of the fields both the consent and the token name, as stored.
CREATE TYPE contact_disclosure AS (
    consent consent_state, outcome charge_outcome, fields smallint[],
    sealed_given_name bytea, sealed_family_name bytea, sealed_sex bytea, sealed_phone bytea, sealed_email bytea,
    given_name text, family_name text, sex smallint, phone text, email text
);

-- The contact views (GetAppointmentContact) of concurrent calls: each consent checked, each
-- partner charged once, each live call recorded, in one statement, one answer per call in
-- the order given. A consent that is not live has nothing counted or recorded (the gateway
-- records the refusal). Caps (AG429) and suspensions as record_basic_disclosures.
CREATE FUNCTION disclose_consented_contacts(
    -- One element per call; p_token_fields[i] is the array literal of the fields call i's token names.
    p_call_partners uuid[], p_key_ids text[], p_rpcs text[], p_trace_ids text[], p_requested_ids text[],
    p_appointment_ids uuid[], p_patient_ids uuid[], p_consent_ids uuid[], p_token_fields text[],
    -- One element per partner to charge, and its terms.
    p_partners uuid[], p_contact_caps integer[], p_patient_caps integer[], p_anomaly_factors double precision[],
    p_anomaly_mins bigint[], p_suspends boolean[],
    -- Per call: the hex SHA-256 of the client certificate it came with ('' without).
    p_client_certs text[]
) RETURNS SETOF contact_disclosure
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $$
DECLARE
    calls     integer := coalesce(cardinality(p_call_partners), 0);
    seen      contact_disclosure[] := '{}';
    c         record;
    r         contact_disclosure;
    granted   smallint[];
    outcomes  charge_outcome[] := '{}';
    suspended uuid[] := '{}';
    patients  uuid[];
    charged   charge_outcome;
BEGIN
    IF cardinality(p_key_ids) IS DISTINCT FROM calls OR cardinality(p_rpcs) IS DISTINCT FROM calls
       OR cardinality(p_trace_ids) IS DISTINCT FROM calls OR cardinality(p_requested_ids) IS DISTINCT FROM calls
       OR cardinality(p_appointment_ids) IS DISTINCT FROM calls OR cardinality(p_patient_ids) IS DISTINCT FROM calls
       OR cardinality(p_consent_ids) IS DISTINCT FROM calls OR cardinality(p_token_fields) IS DISTINCT FROM calls
       OR cardinality(p_client_certs) IS DISTINCT FROM calls THEN
        RAISE EXCEPTION 'disclose_consented_contacts: call arrays of different lengths';
    END IF;
    -- Each call's consent, read once: its state and the values of the fields both it and the token name.
    FOR k IN 1 .. calls LOOP
        SELECT * INTO c FROM read_consented_contact(p_consent_ids[k], p_call_partners[k], p_patient_ids[k]);
        IF NOT FOUND THEN  -- the patient row vanished: as an unknown consent
            seen[k] := ROW('unknown', NULL, '{}',
                           NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)::contact_disclosure;
        ELSIF c.state <> 'live' THEN
            seen[k] := ROW(c.state, NULL, c.fields,
                           NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)::contact_disclosure;
        ELSE
            granted := ARRAY(SELECT DISTINCT f FROM unnest(c.fields) AS f
                             WHERE f = ANY (p_token_fields[k]::smallint[]) ORDER BY f);
            seen[k] := ROW('live', NULL, granted,
                           CASE WHEN 1 = ANY (granted) THEN c.sealed_given_name END,
                           CASE WHEN 1 = ANY (granted) THEN c.sealed_family_name END,
                           CASE WHEN 2 = ANY (granted) THEN c.sealed_sex END,
                           CASE WHEN 3 = ANY (granted) THEN c.sealed_phone END,
                           CASE WHEN 4 = ANY (granted) THEN c.sealed_email END,
                           CASE WHEN 1 = ANY (granted) THEN c.given_name END,
                           CASE WHEN 1 = ANY (granted) THEN c.family_name END,
                           CASE WHEN 2 = ANY (granted) THEN c.sex END,
                           CASE WHEN 3 = ANY (granted) THEN c.phone END,
                           CASE WHEN 4 = ANY (granted) THEN c.email END)::contact_disclosure;
        END IF;
    END LOOP;
    FOR i IN 1 .. coalesce(cardinality(p_partners), 0) LOOP
        patients := '{}';
        FOR k IN 1 .. calls LOOP
            IF p_call_partners[k] = p_partners[i] AND (seen[k]).consent = 'live' THEN
                patients := patients || p_patient_ids[k];
            END IF;
        END LOOP;
        charged := 'ok';
        IF cardinality(patients) > 0 THEN
            charged := charge_partner_usage(p_partners[i], patients, cardinality(patients), p_contact_caps[i],
                                            p_patient_caps[i], p_anomaly_factors[i], p_anomaly_mins[i], p_suspends[i]);
        END IF;
        IF charged IN ('contact_cap', 'patient_cap') THEN
            RAISE EXCEPTION 'daily cap reached' USING ERRCODE = 'AG429', DETAIL = charged, HINT = p_partners[i]::text;
        END IF;
        IF charged = 'suspended' THEN
            suspended := suspended || p_partners[i];
        END IF;
        outcomes := outcomes || charged;
    END LOOP;
    -- One record per live call of a partner not suspended; one answer per call, in the order given.
    FOR k IN 1 .. calls LOOP
        r := seen[k];
        IF r.consent = 'live' THEN
            IF p_call_partners[k] = ANY (suspended) THEN
                r := ROW('live', 'suspended', '{}',
                         NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)::contact_disclosure;
            ELSE
                INSERT INTO disclosures (partner_id, key_id, view, contact_fields, consent_id, rpc, trace_id,
                                         client_cert, outcome, denial_reason, requested_ids, appointment_ids,
                                         patient_ids)
                VALUES (p_call_partners[k], p_key_ids[k], 2, r.fields, p_consent_ids[k], p_rpcs[k],
                        coalesce(p_trace_ids[k], ''), p_client_certs[k], 1, '', ARRAY[p_requested_ids[k]],
                        ARRAY[p_appointment_ids[k]], ARRAY[p_patient_ids[k]]);
                r.outcome := outcomes[array_position(p_partners, p_call_partners[k])];
            END IF;
        END IF;
        RETURN NEXT r;
    END LOOP;
END
$$;
REVOKE ALL ON FUNCTION disclose_consented_contacts(uuid[], text[], text[], text[], text[], uuid[], uuid[], uuid[],
    text[], uuid[], integer[], integer[], double precision[], bigint[], boolean[], text[]) FROM PUBLIC;

-- The sequencer: chains up to p_limit committed records in (txid, id) order; returns how
-- many it chained (0 when none waits, or while another process holds the lock). Every
-- record after the cursor whose transaction is older than every running one has committed
-- (or never will), so none is skipped. Sorts and bitmap scans are off inside it, so that
-- whatever the statistics say the one plan left is the ordered index scan of the cursor:
-- with stale statistics a sort of the whole backlog made every pass slower than the last.
CREATE FUNCTION chain_disclosures(p_limit integer) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, public
SET enable_sort = off
SET enable_bitmapscan = off
AS $$
DECLARE
    head     ledger_head;
    rec      disclosures;
    horizon  xid8 := pg_snapshot_xmin(pg_current_snapshot());
    now      timestamptz := clock_timestamp();
    chained  integer := 0;
    ids      bigint[] := '{}';
    seqs     bigint[] := '{}';
    prevs    bytea[] := '{}';
    hashes   bytea[] := '{}';
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
        chained := chained + 1;
        head.chained_txid := rec.txid;
        head.chained_id := rec.id;
        ids[chained] := rec.id;
        seqs[chained] := head.seq + 1;
        prevs[chained] := head.hash;
        hashes[chained] := disclosure_digest(rec, head.seq + 1, head.hash, now);
        head.seq := head.seq + 1;
        head.hash := hashes[chained];
    END LOOP;
    IF chained > 0 THEN
        INSERT INTO disclosure_chain (id, seq, prev_hash, chain_time, hash)
        SELECT c.id, c.seq, c.prev, now, c.hash FROM unnest(ids, seqs, prevs, hashes) AS c(id, seq, prev, hash);
        UPDATE ledger_head SET seq = head.seq, hash = head.hash, chained_txid = head.chained_txid,
            chained_id = head.chained_id;
    END IF;
    RETURN chained;
END
$$;
REVOKE ALL ON FUNCTION chain_disclosures(integer) FROM PUBLIC;
