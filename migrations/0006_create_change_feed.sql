-- The change feed behind WatchAppointments: an outbox written by a trigger in the same
-- transaction as the appointment change, so a committed change is never missed and an
-- uncommitted one never seen.
--
-- Positions are taken from change_feed_head under a row lock held until commit: they are
-- gapless and in commit order, so "everything after position P" is exact and a resume token
-- is just a position. The lock serialises appointment writes (not reads). A NOTIFY carrying
-- the position wakes each gateway process's one listener when the transaction commits;
-- grant and key changes notify on a channel of their own, so streams follow them live.

CREATE TABLE change_feed_head (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    position        bigint NOT NULL,
    -- Changes at or below this position were deleted by retention (APPTGATE_FEED_RETENTION).
    pruned_through  bigint NOT NULL
);
INSERT INTO change_feed_head (position, pruned_through) VALUES (0, 0);

CREATE TABLE appointment_changes (
    position        bigint PRIMARY KEY,
    -- appointments.partner.v1.ChangeType: 1 created, 2 updated, 3 cancelled.
    change_type     smallint NOT NULL CHECK (change_type IN (1, 2, 3)),
    appointment_id  uuid NOT NULL,
    practitioner_id uuid NOT NULL,
    -- The basic-view state the change left (never a contact value or the reason).
    patient_id      uuid NOT NULL,
    start_time      timestamptz NOT NULL,
    end_time        timestamptz NOT NULL,
    status          appointment_status NOT NULL,
    update_time     timestamptz NOT NULL,
    commit_time     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX appointment_changes_practitioner_idx ON appointment_changes (practitioner_id, position);
CREATE INDEX appointment_changes_time_idx ON appointment_changes (commit_time);

CREATE FUNCTION record_appointment_change() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
    next_position bigint;
    kind smallint;
BEGIN
    IF TG_OP = 'INSERT' THEN
        kind := 1;
    ELSIF NEW.status = 'cancelled' AND OLD.status <> 'cancelled' THEN
        kind := 3;
    ELSIF (NEW.start_time, NEW.end_time, NEW.status, NEW.practitioner_id, NEW.patient_id)
          IS NOT DISTINCT FROM (OLD.start_time, OLD.end_time, OLD.status, OLD.practitioner_id, OLD.patient_id) THEN
        RETURN NULL;  -- nothing a partner can see changed (the visit reason, say)
    ELSE
        kind := 2;
    END IF;
    UPDATE change_feed_head SET position = position + 1 RETURNING position INTO next_position;
    INSERT INTO appointment_changes
        (position, change_type, appointment_id, practitioner_id, patient_id, start_time, end_time, status, update_time)
    VALUES
        (next_position, kind, NEW.id, NEW.practitioner_id, NEW.patient_id, NEW.start_time, NEW.end_time, NEW.status,
         NEW.update_time);
    PERFORM pg_notify('apptgate_appointment_changes', next_position::text);
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION record_appointment_change() FROM PUBLIC;
CREATE TRIGGER appointments_change_feed AFTER INSERT OR UPDATE ON appointments
    FOR EACH ROW EXECUTE FUNCTION record_appointment_change();

CREATE FUNCTION notify_access_change() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $$
BEGIN
    IF TG_TABLE_NAME = 'practitioner_grants' THEN
        PERFORM pg_notify('apptgate_access_changes', 'partner:' || NEW.partner_id::text);
    ELSE
        PERFORM pg_notify('apptgate_access_changes', 'key:' || NEW.id);
    END IF;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION notify_access_change() FROM PUBLIC;
CREATE TRIGGER practitioner_grants_notify AFTER INSERT OR UPDATE ON practitioner_grants
    FOR EACH ROW EXECUTE FUNCTION notify_access_change();
CREATE TRIGGER partner_keys_notify AFTER UPDATE OF revoke_time ON partner_keys
    FOR EACH ROW EXECUTE FUNCTION notify_access_change();
