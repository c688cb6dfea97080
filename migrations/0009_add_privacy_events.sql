-- Privacy events: what a platform tells a patient at once (WatchPrivacyEvents). A consent
-- requested, granted, revoked or expired; a partner's first receipt of any contact field of
-- the patient; the suspension of a partner that received the patient's data that day.
--
-- Events are written by triggers in the transaction that makes them true, so none is lost or
-- told of something that did not commit. Positions are taken from privacy_event_head under a
-- row lock held until commit: gapless and in commit order, so a resume token is a position.
-- The triggers on consent_requests and consents are named to fire before those of 0008, so
-- every transaction takes this head before a partner's consent-request head (one lock order).
-- A consent's expiry writes nothing by itself: a sweep in each gateway process announces it
-- once (announce_expired_consents). Events carry ids and field numbers, never a value.

CREATE TABLE privacy_event_head (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    position  bigint NOT NULL
);
INSERT INTO privacy_event_head (position) VALUES (0);

CREATE TABLE privacy_events (
    position           bigint PRIMARY KEY,
    -- appointments.internal.v1.PrivacyEventType: 1 consent requested, 2 consent granted,
    -- 3 consent revoked, 4 consent expired, 5 contact first disclosed, 6 partner suspended.
    type               smallint NOT NULL CHECK (type BETWEEN 1 AND 6),
    patient_id         uuid NOT NULL,
    partner_id         uuid NOT NULL,
    consent_id         uuid,
    consent_request_id uuid,
    -- appointments.type.v1.ContactField numbers.
    fields             smallint[] NOT NULL DEFAULT '{}',
    event_time         timestamptz NOT NULL DEFAULT statement_timestamp()
);

-- Append one event per patient of p_patients, in that order, and wake the listeners.
CREATE FUNCTION append_privacy_events(
    p_type smallint, p_patients uuid[], p_partner_id uuid, p_consent_id uuid, p_request_id uuid, p_fields smallint[]
) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $$
DECLARE
    last bigint;
    n integer := coalesce(cardinality(p_patients), 0);
BEGIN
    IF n = 0 THEN
        RETURN;
    END IF;
    UPDATE privacy_event_head SET position = position + n RETURNING position INTO last;
    INSERT INTO privacy_events (position, type, patient_id, partner_id, consent_id, consent_request_id, fields)
    SELECT last - n + u.k, p_type, u.patient_id, p_partner_id, p_consent_id, p_request_id, coalesce(p_fields, '{}')
    FROM unnest(p_patients) WITH ORDINALITY AS u(patient_id, k);
    PERFORM pg_notify('apptgate_privacy_events', last::text);
END
$$;
REVOKE ALL ON FUNCTION append_privacy_events(smallint, uuid[], uuid, uuid, uuid, smallint[]) FROM PUBLIC;

CREATE FUNCTION announce_consent_request() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $$
BEGIN
    PERFORM append_privacy_events(1::smallint, ARRAY[NEW.patient_id], NEW.partner_id, NULL, NEW.id, NEW.fields);
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION announce_consent_request() FROM PUBLIC;
CREATE TRIGGER consent_requests_announce AFTER INSERT ON consent_requests
    FOR EACH ROW EXECUTE FUNCTION announce_consent_request();

-- Whether a consent's expiry was announced (a revoked consent's never is: it ended earlier).
ALTER TABLE consents ADD COLUMN expire_announced boolean NOT NULL DEFAULT false;
CREATE INDEX consents_unannounced_expiry_idx ON consents (expire_time)
    WHERE NOT expire_announced AND revoke_time IS NULL;

CREATE FUNCTION announce_consent_change() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM append_privacy_events(2::smallint, ARRAY[NEW.patient_id], NEW.partner_id, NEW.id, NULL, NEW.fields);
    ELSIF OLD.revoke_time IS NULL AND NEW.revoke_time IS NOT NULL THEN
        PERFORM append_privacy_events(3::smallint, ARRAY[NEW.patient_id], NEW.partner_id, NEW.id, NULL, NEW.fields);
    END IF;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION announce_consent_change() FROM PUBLIC;
CREATE TRIGGER consents_announce AFTER INSERT OR UPDATE OF revoke_time ON consents
    FOR EACH ROW EXECUTE FUNCTION announce_consent_change();

-- Announce up to p_limit consents past their expiry, each once (rows another process is
-- announcing are skipped); returns how many.
CREATE FUNCTION announce_expired_consents(p_limit integer) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $$
DECLARE
    c record;
    n integer := 0;
BEGIN
    FOR c IN
        UPDATE consents SET expire_announced = true WHERE id IN (
            SELECT id FROM consents
            WHERE NOT expire_announced AND revoke_time IS NULL AND expire_time <= statement_timestamp()
            ORDER BY expire_time LIMIT p_limit FOR UPDATE SKIP LOCKED)
        RETURNING id, patient_id, partner_id, fields, expire_time
    LOOP
        PERFORM append_privacy_events(4::smallint, ARRAY[c.patient_id], c.partner_id, c.id, NULL, c.fields);
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;
REVOKE ALL ON FUNCTION announce_expired_consents(integer) FROM PUBLIC;

-- The partners that have received contact details of each patient, and since when.
CREATE TABLE contact_recipients (
    partner_id uuid NOT NULL,
    patient_id uuid NOT NULL,
    first_time timestamptz NOT NULL DEFAULT statement_timestamp(),
    PRIMARY KEY (partner_id, patient_id)
);

-- A contact disclosure's patients the partner never received contact details of before.
CREATE FUNCTION announce_first_contact() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $$
DECLARE
    patients uuid[] := NEW.patient_ids;
    firsts uuid[];
BEGIN
    IF patients IS NULL THEN
        SELECT o.patient_ids INTO patients FROM disclosures o WHERE o.id = NEW.items_of;
    END IF;
    WITH added AS (
        INSERT INTO contact_recipients (partner_id, patient_id)
        SELECT DISTINCT NEW.partner_id, p FROM unnest(patients) AS p WHERE p IS NOT NULL
        ON CONFLICT (partner_id, patient_id) DO NOTHING
        RETURNING patient_id
    )
    SELECT array_agg(patient_id ORDER BY patient_id) INTO firsts FROM added;
    PERFORM append_privacy_events(5::smallint, firsts, NEW.partner_id, NEW.consent_id, NULL, NEW.contact_fields);
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION announce_first_contact() FROM PUBLIC;
-- Basic-view records, nearly all of them, pay only the WHEN test.
CREATE TRIGGER disclosures_announce_first_contact AFTER INSERT ON disclosures
    FOR EACH ROW WHEN (NEW.view = 2 AND NEW.outcome = 1)
    EXECUTE FUNCTION announce_first_contact();

-- A partner suspended (after an anomaly): every patient the ledger says it was sent data of
-- that UTC day (the response that crossed the threshold was sent nothing).
CREATE FUNCTION announce_suspension() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $$
BEGIN
    IF NEW.suspend_time IS NOT NULL AND (TG_OP = 'INSERT' OR OLD.suspend_time IS NULL) THEN
        PERFORM append_privacy_events(
            6::smallint,
            ARRAY(SELECT DISTINCT d.patient_id FROM disclosure_items d
                  WHERE d.partner_id = NEW.partner_id AND d.outcome = 1 AND d.patient_id IS NOT NULL
                    AND d.disclose_time >= date_trunc('day', statement_timestamp() AT TIME ZONE 'UTC')
                                           AT TIME ZONE 'UTC'
                  ORDER BY d.patient_id),
            NEW.partner_id, NULL, NULL, '{}');
    END IF;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION announce_suspension() FROM PUBLIC;
CREATE TRIGGER partner_limits_announce_suspension AFTER INSERT OR UPDATE OF suspend_time ON partner_limits
    FOR EACH ROW EXECUTE FUNCTION announce_suspension();

-- What was told stays told: the privacy events and the consent-request events (0008) are
-- append-only, like the ledger.
CREATE FUNCTION refuse_event_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER privacy_events_append_only BEFORE UPDATE OR DELETE ON privacy_events
    FOR EACH ROW EXECUTE FUNCTION refuse_event_change();
CREATE TRIGGER privacy_events_no_truncate BEFORE TRUNCATE ON privacy_events
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_event_change();
CREATE TRIGGER consent_request_events_append_only BEFORE UPDATE OR DELETE ON consent_request_events
    FOR EACH ROW EXECUTE FUNCTION refuse_event_change();
CREATE TRIGGER consent_request_events_no_truncate BEFORE TRUNCATE ON consent_request_events
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_event_change();
