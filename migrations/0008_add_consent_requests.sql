-- Consent requests: a partner asks a patient to release some contact fields to it
-- (RequestContactAccess); the patient approves (possibly narrower) or denies it in the
-- platform's app, the partner may cancel it while it is pending, and it lapses otherwise.
--
-- Every change of a request, and the revocation of the consent its approval created, appends
-- an event numbered per partner without gaps and in commit order (a row lock on the partner's
-- head, held until commit), which WatchConsentRequests replays from a resume token and follows
-- live (NOTIFY apptgate_consent_requests, payload the partner id).
--
-- A request made is a ledger record of outcome 3 (requested), one refused (a duplicate, a cap)
-- a record of outcome 2, and an approval a record of outcome 4 naming the consent it created;
-- the ledger's shape checks (0005) are widened for them. The purpose and message are the
-- partner's text, sealed like contact details (service/crypto/sealing.py), never logged.

CREATE TYPE consent_request_state AS ENUM ('pending', 'approved', 'denied', 'expired', 'cancelled');

CREATE TABLE consent_requests (
    id             uuid PRIMARY KEY,
    partner_id     uuid NOT NULL REFERENCES partners (id),
    -- The key that asked: what a breach report of that key counts.
    key_id         text NOT NULL,
    appointment_id uuid NOT NULL REFERENCES appointments (id),
    patient_id     uuid NOT NULL REFERENCES patients (id),
    -- appointments.type.v1.ContactField numbers asked for, sorted and distinct.
    fields         smallint[] NOT NULL CHECK (cardinality(fields) BETWEEN 1 AND 4 AND fields <@ '{1,2,3,4}'),
    sealed_purpose bytea NOT NULL,
    sealed_message bytea,
    -- How long the consent would last if approved as asked.
    ttl            interval NOT NULL CHECK (ttl > interval '0'),
    state          consent_request_state NOT NULL DEFAULT 'pending',
    create_time    timestamptz NOT NULL DEFAULT statement_timestamp(),
    -- When a pending request lapses (APPTGATE_CONSENT_REQUEST_TTL after it was made).
    expire_time    timestamptz NOT NULL,
    decide_time    timestamptz,
    granted_fields smallint[],
    consent_id     uuid UNIQUE REFERENCES consents (id),
    CHECK (expire_time > create_time),
    CHECK ((state = 'pending') = (decide_time IS NULL)),
    CHECK ((state = 'approved') = (consent_id IS NOT NULL)),
    CHECK ((state = 'approved') = (granted_fields IS NOT NULL)),
    CHECK (granted_fields IS NULL OR (cardinality(granted_fields) > 0 AND granted_fields <@ fields))
);
-- At most one pending request per partner, patient and field set.
CREATE UNIQUE INDEX consent_requests_pending_idx ON consent_requests (partner_id, patient_id, fields)
    WHERE state = 'pending';
-- The patient app's list, newest first.
CREATE INDEX consent_requests_patient_idx ON consent_requests (patient_id, create_time DESC, id DESC);
-- A partner's requests to one patient in the last 30 days (at most 3).
CREATE INDEX consent_requests_asked_idx ON consent_requests (partner_id, patient_id, create_time);
-- The pending requests by lapse time, for the sweep that expires them.
CREATE INDEX consent_requests_lapse_idx ON consent_requests (expire_time) WHERE state = 'pending';
-- The data key each row is sealed under (as migration 0001's indexes for its tables).
CREATE INDEX consent_requests_data_key_idx ON consent_requests ((substring(sealed_purpose FROM 1 FOR 3)));

-- Requests made per partner and UTC day, against APPTGATE_CONSENT_REQUEST_DAILY_CAP. The row
-- is also the lock that makes a partner's requests take turns, so both caps are exact.
CREATE TABLE consent_request_days (
    partner_id uuid NOT NULL REFERENCES partners (id),
    day        date NOT NULL,
    requests   integer NOT NULL CHECK (requests >= 0),
    PRIMARY KEY (partner_id, day)
);

CREATE TABLE consent_request_heads (
    partner_id uuid PRIMARY KEY REFERENCES partners (id),
    position   bigint NOT NULL
);

CREATE TABLE consent_request_events (
    partner_id      uuid NOT NULL,
    position        bigint NOT NULL,
    request_id      uuid NOT NULL REFERENCES consent_requests (id),
    -- The state the change left the request in.
    state           consent_request_state NOT NULL,
    -- True for the revocation of an approved request's consent.
    consent_revoked boolean NOT NULL DEFAULT false,
    event_time      timestamptz NOT NULL DEFAULT statement_timestamp(),
    PRIMARY KEY (partner_id, position)
);

CREATE FUNCTION append_consent_request_event(p_partner_id uuid, p_request_id uuid, p_state consent_request_state,
                                             p_consent_revoked boolean) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $$
DECLARE
    next_position bigint;
BEGIN
    INSERT INTO consent_request_heads AS h (partner_id, position) VALUES (p_partner_id, 1)
    ON CONFLICT (partner_id) DO UPDATE SET position = h.position + 1
    RETURNING h.position INTO next_position;
    INSERT INTO consent_request_events (partner_id, position, request_id, state, consent_revoked)
    VALUES (p_partner_id, next_position, p_request_id, p_state, p_consent_revoked);
    PERFORM pg_notify('apptgate_consent_requests', p_partner_id::text);
END
$$;
REVOKE ALL ON FUNCTION append_consent_request_event(uuid, uuid, consent_request_state, boolean) FROM PUBLIC;

-- Every change of a request's state is an event, whichever statement made it.
CREATE FUNCTION record_consent_request_change() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $$
BEGIN
    IF TG_TABLE_NAME = 'consents' THEN
        PERFORM append_consent_request_event(r.partner_id, r.id, r.state, true)
        FROM consent_requests r WHERE r.consent_id = NEW.id;
    ELSIF TG_OP = 'INSERT' OR NEW.state <> OLD.state THEN
        PERFORM append_consent_request_event(NEW.partner_id, NEW.id, NEW.state, false);
    END IF;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION record_consent_request_change() FROM PUBLIC;
CREATE TRIGGER consent_requests_events AFTER INSERT OR UPDATE OF state ON consent_requests
    FOR EACH ROW EXECUTE FUNCTION record_consent_request_change();
CREATE TRIGGER consents_request_events AFTER UPDATE OF revoke_time ON consents
    FOR EACH ROW WHEN (OLD.revoke_time IS NULL AND NEW.revoke_time IS NOT NULL)
    EXECUTE FUNCTION record_consent_request_change();

-- The ledger holds requests and approvals too: outcome 3 (a request: the fields asked for, no
-- consent) and 4 (an approval: the fields granted and the consent created); a reason only on
-- a refusal.
ALTER TABLE disclosures DROP CONSTRAINT disclosures_outcome_check;
ALTER TABLE disclosures ADD CONSTRAINT disclosures_outcome_check CHECK (outcome IN (1, 2, 3, 4));
ALTER TABLE disclosures DROP CONSTRAINT disclosures_refusal_check;
ALTER TABLE disclosures ADD CONSTRAINT disclosures_refusal_check CHECK ((outcome = 2) = (denial_reason <> ''));
ALTER TABLE disclosures DROP CONSTRAINT disclosures_contact_check;
ALTER TABLE disclosures ADD CONSTRAINT disclosures_contact_check CHECK (
    (view = 1 AND contact_fields = '{}' AND consent_id IS NULL AND outcome IN (1, 2))
    OR (view = 2 AND outcome = 2)
    OR (view = 2 AND outcome IN (1, 4) AND consent_id IS NOT NULL)
    OR (view = 2 AND outcome = 3 AND consent_id IS NULL)
);

-- RequestContactAccess after the partner path read the appointment (partner_get_appointment,
-- which verified the key and the grant): in one transaction, the request made or refused and
-- its ledger record. The caps and the lapse come from the gateway's settings, which only the
-- gateway's own role may pass: the partner role cannot call this function. Returns the outcome
-- ('created', 'duplicate', 'daily_cap', 'patient_cap'), the request made or the pending one
-- it duplicates, and for a cap the time it frees up.
CREATE FUNCTION request_contact_access(
    p_request_id uuid, p_partner_id uuid, p_key_id text, p_appointment_id uuid, p_patient_id uuid,
    p_requested_id text, p_fields smallint[], p_sealed_purpose bytea, p_sealed_message bytea, p_ttl interval,
    p_lapse interval, p_daily_cap integer, p_patient_cap integer, p_patient_window interval,
    p_rpc text, p_trace_id text, p_client_cert text
) RETURNS TABLE (outcome text, request_id uuid, retry_time timestamptz)
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $$
DECLARE
    today date := (statement_timestamp() AT TIME ZONE 'UTC')::date;
    made integer;
    pending uuid;
    oldest timestamptz;
    refusal text;
BEGIN
    INSERT INTO consent_request_days AS d (partner_id, day, requests) VALUES (p_partner_id, today, 0)
    ON CONFLICT (partner_id, day) DO NOTHING;
    SELECT d.requests INTO made FROM consent_request_days d
    WHERE d.partner_id = p_partner_id AND d.day = today FOR UPDATE;
    -- A pending request past its time has lapsed, whether or not the sweep got to it.
    UPDATE consent_requests r SET state = 'expired', decide_time = r.expire_time
    WHERE r.partner_id = p_partner_id AND r.patient_id = p_patient_id AND r.state = 'pending'
      AND r.expire_time <= statement_timestamp();
    SELECT r.id INTO pending FROM consent_requests r
    WHERE r.partner_id = p_partner_id AND r.patient_id = p_patient_id AND r.fields = p_fields
      AND r.state = 'pending';
    IF pending IS NOT NULL THEN
        outcome := 'duplicate'; request_id := pending; refusal := 'CONSENT_REQUEST_PENDING';
    ELSIF made >= p_daily_cap THEN
        outcome := 'daily_cap'; refusal := 'CONSENT_REQUEST_DAILY_CAP';
        retry_time := (today + 1)::timestamp AT TIME ZONE 'UTC';
    ELSE
        SELECT min(t.create_time), count(*) INTO oldest, made FROM (
            SELECT r.create_time FROM consent_requests r
            WHERE r.partner_id = p_partner_id AND r.patient_id = p_patient_id
              AND r.create_time > statement_timestamp() - p_patient_window
            ORDER BY r.create_time DESC LIMIT p_patient_cap) t;
        IF made >= p_patient_cap THEN
            outcome := 'patient_cap'; refusal := 'CONSENT_REQUEST_PATIENT_CAP';
            retry_time := oldest + p_patient_window;
        END IF;
    END IF;
    IF refusal IS NOT NULL THEN
        INSERT INTO disclosures (partner_id, key_id, view, contact_fields, rpc, trace_id, client_cert, outcome,
                                 denial_reason, requested_ids, appointment_ids, patient_ids)
        VALUES (p_partner_id, p_key_id, 2, p_fields, p_rpc, p_trace_id, p_client_cert, 2, refusal,
                ARRAY[p_requested_id], ARRAY[p_appointment_id], ARRAY[p_patient_id]);
        RETURN NEXT;
        RETURN;
    END IF;
    INSERT INTO consent_requests (id, partner_id, key_id, appointment_id, patient_id, fields, sealed_purpose,
                                  sealed_message, ttl, expire_time)
    VALUES (p_request_id, p_partner_id, p_key_id, p_appointment_id, p_patient_id, p_fields, p_sealed_purpose,
            p_sealed_message, p_ttl, statement_timestamp() + p_lapse);
    UPDATE consent_request_days d SET requests = d.requests + 1 WHERE d.partner_id = p_partner_id AND d.day = today;
    INSERT INTO disclosures (partner_id, key_id, view, contact_fields, rpc, trace_id, client_cert, outcome,
                             requested_ids, appointment_ids, patient_ids)
    VALUES (p_partner_id, p_key_id, 2, p_fields, p_rpc, p_trace_id, p_client_cert, 3,
            ARRAY[p_requested_id], ARRAY[p_appointment_id], ARRAY[p_patient_id]);
    outcome := 'created'; request_id := p_request_id;
    RETURN NEXT;
END
$$;
REVOKE ALL ON FUNCTION request_contact_access(
    uuid, uuid, text, uuid, uuid, text, smallint[], bytea, bytea, interval, interval, integer, integer, interval,
    text, text, text
) FROM PUBLIC;

-- A request as the partner path reads it: the request, its consent's times and (for the token,
-- rebuilt by the gateway) the consent's own fields and purpose. Never the message.
CREATE TYPE partner_consent_request AS (
    id uuid, appointment_id uuid, patient_id uuid, fields smallint[], sealed_purpose bytea, state consent_request_state,
    create_time timestamptz, expire_time timestamptz, decide_time timestamptz, granted_fields smallint[],
    consent_id uuid, consent_purpose text, consent_create_time timestamptz, consent_expire_time timestamptz,
    consent_revoke_time timestamptz
);

-- One of the key's partner's requests; no row for another partner's or none. A pending
-- request past its time is read as expired.
CREATE FUNCTION partner_consent_request(p_key_id text, p_credential bytea, p_request_id uuid)
RETURNS SETOF partner_consent_request
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
    partner uuid := partner_admit(p_key_id, p_credential);
BEGIN
    RETURN QUERY
    SELECT r.id, r.appointment_id, r.patient_id, r.fields, r.sealed_purpose,
           CASE WHEN r.state = 'pending' AND r.expire_time <= statement_timestamp()
                THEN 'expired'::consent_request_state ELSE r.state END,
           r.create_time, r.expire_time,
           CASE WHEN r.state = 'pending' AND r.expire_time <= statement_timestamp()
                THEN r.expire_time ELSE r.decide_time END,
           r.granted_fields, r.consent_id, c.purpose, c.create_time, c.expire_time, c.revoke_time
    FROM consent_requests r LEFT JOIN consents c ON c.id = r.consent_id
    WHERE r.id = p_request_id AND r.partner_id = partner;
END
$$;
REVOKE ALL ON FUNCTION partner_consent_request(text, bytea, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION partner_consent_request(text, bytea, uuid) TO apptgate_partner;

-- CancelConsentRequest: the key's partner's pending request cancelled. Returns the outcome
-- ('cancelled', 'not_pending', 'not_found'); the request is read again by the caller.
CREATE FUNCTION partner_cancel_consent_request(p_key_id text, p_credential bytea, p_request_id uuid)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
    partner uuid := partner_admit(p_key_id, p_credential);
    current_state consent_request_state;
    lapse timestamptz;
BEGIN
    SELECT r.state, r.expire_time INTO current_state, lapse FROM consent_requests r
    WHERE r.id = p_request_id AND r.partner_id = partner FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'not_found';
    END IF;
    IF current_state = 'pending' AND lapse <= statement_timestamp() THEN
        UPDATE consent_requests SET state = 'expired', decide_time = lapse WHERE id = p_request_id;
        RETURN 'not_pending';
    END IF;
    IF current_state <> 'pending' THEN
        RETURN 'not_pending';
    END IF;
    UPDATE consent_requests SET state = 'cancelled', decide_time = statement_timestamp() WHERE id = p_request_id;
    RETURN 'cancelled';
END
$$;
REVOKE ALL ON FUNCTION partner_cancel_consent_request(text, bytea, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION partner_cancel_consent_request(text, bytea, uuid) TO apptgate_partner;

-- WatchConsentRequests: the key's partner's last event position (where a stream without a
-- resume token starts), and its events after p_after, each with its request.
CREATE FUNCTION partner_consent_request_head(p_key_id text, p_credential bytea) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
    partner uuid := partner_admit(p_key_id, p_credential);
BEGIN
    RETURN coalesce((SELECT h.position FROM consent_request_heads h WHERE h.partner_id = partner), 0);
END
$$;
REVOKE ALL ON FUNCTION partner_consent_request_head(text, bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION partner_consent_request_head(text, bytea) TO apptgate_partner;

CREATE FUNCTION partner_consent_request_events(p_key_id text, p_credential bytea, p_after bigint, p_limit integer)
RETURNS TABLE (event_position bigint, event_state consent_request_state, request partner_consent_request)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
    partner uuid := partner_admit(p_key_id, p_credential);
BEGIN
    RETURN QUERY
    SELECT e.position, e.state,
           ROW(r.id, r.appointment_id, r.patient_id, r.fields, r.sealed_purpose, r.state, r.create_time,
               r.expire_time, r.decide_time, r.granted_fields, r.consent_id, c.purpose, c.create_time,
               c.expire_time, c.revoke_time)::partner_consent_request
    FROM consent_request_events e
    JOIN consent_requests r ON r.id = e.request_id
    LEFT JOIN consents c ON c.id = r.consent_id
    WHERE e.partner_id = partner AND e.position > p_after
    ORDER BY e.position
    LIMIT p_limit;
END
$$;
REVOKE ALL ON FUNCTION partner_consent_request_events(text, bytea, bigint, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION partner_consent_request_events(text, bytea, bigint, integer) TO apptgate_partner;
