-- Limits on bulk extraction: per-partner overrides, daily counters, and the charge.
--
-- The daily caps (contact disclosures, distinct patients reached) hold across every gateway
-- process because they are counted here, in the statement that records the disclosure they
-- allow (0005): a response over a cap rolls back its own count. A partner whose patients of
-- the day jump far above its own recent norm is flagged (partner_events), and suspended when
-- the gateway is configured to. The request rate is limited in the gateway, per process.

-- The answer of a charge, and of the record statements built on it.
CREATE TYPE charge_outcome AS ENUM (
    'ok',           -- counted
    'flagged',      -- counted, and this response crossed the anomaly threshold
    'suspended',    -- crossed it and the partner is now suspended: record nothing, send nothing
    'contact_cap',  -- over the daily contact cap: roll back
    'patient_cap'   -- over the daily patient cap: roll back
);

-- What happened to a partner's standing.
CREATE TYPE partner_event_kind AS ENUM ('anomaly', 'suspended', 'lifted', 'limits');

-- Per-partner overrides of the configured defaults (NULL: the default), and the suspension.
CREATE TABLE partner_limits (
    partner_id          uuid PRIMARY KEY REFERENCES partners (id),
    requests_per_second double precision CHECK (requests_per_second > 0),
    burst               integer CHECK (burst > 0),
    contact_daily_cap   integer CHECK (contact_daily_cap >= 0),
    patient_daily_cap   integer CHECK (patient_daily_cap >= 0),
    suspend_time        timestamptz,
    suspend_reason      text NOT NULL DEFAULT '',
    update_time         timestamptz NOT NULL DEFAULT now()
);

-- One row per partner and UTC day: what the caps and the anomaly detector read.
CREATE TABLE partner_daily_usage (
    partner_id          uuid NOT NULL REFERENCES partners (id),
    day                 date NOT NULL,
    contact_disclosures bigint NOT NULL DEFAULT 0,
    patients_reached    bigint NOT NULL DEFAULT 0,
    flag_time           timestamptz,
    -- The transaction that created the row: a row deleted and created again (counters started
    -- over) has another. The gateway's memo of counted patients is valid under one row only.
    counted_since       xid8 NOT NULL DEFAULT pg_current_xact_id(),
    PRIMARY KEY (partner_id, day)
);

-- Which patients a partner reached on a day, so each is counted once.
CREATE TABLE partner_daily_patients (
    partner_id uuid NOT NULL,
    day        date NOT NULL,
    patient_id uuid NOT NULL,
    PRIMARY KEY (partner_id, day, patient_id)
);

CREATE TABLE partner_events (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    partner_id uuid NOT NULL REFERENCES partners (id),
    kind       partner_event_kind NOT NULL,
    detail     text NOT NULL DEFAULT '',
    event_time timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX partner_events_partner_idx ON partner_events (partner_id, event_time);

-- Counts one response's patients and contact disclosures against the partner's day (UTC).
-- A response that reaches no new patient and discloses no contact touches no counter row,
-- so re-listing an agenda takes no lock. The anomaly detector follows distinct patients
-- reached, which is what a bulk extraction grows.
CREATE FUNCTION charge_partner_usage(
    p_partner_id uuid, p_patient_ids uuid[], p_contacts integer,
    p_contact_cap integer, p_patient_cap integer, p_anomaly_factor double precision, p_anomaly_min bigint,
    p_suspend boolean
) RETURNS charge_outcome
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $$
DECLARE
    today   date := (statement_timestamp() AT TIME ZONE 'UTC')::date;
    limits  partner_limits;
    usage   partner_daily_usage;
    fresh   bigint;
    norm    double precision;
BEGIN
    WITH added AS (
        INSERT INTO partner_daily_patients (partner_id, day, patient_id)
        SELECT DISTINCT p_partner_id, today, p FROM unnest(p_patient_ids) AS p WHERE p IS NOT NULL
        ON CONFLICT DO NOTHING
        RETURNING 1
    )
    SELECT count(*) INTO fresh FROM added;
    IF fresh = 0 AND p_contacts = 0 THEN
        RETURN 'ok';
    END IF;
    SELECT * INTO limits FROM partner_limits WHERE partner_id = p_partner_id;
    INSERT INTO partner_daily_usage AS u (partner_id, day, contact_disclosures, patients_reached)
    VALUES (p_partner_id, today, p_contacts, fresh)
    ON CONFLICT (partner_id, day) DO UPDATE SET
        contact_disclosures = u.contact_disclosures + EXCLUDED.contact_disclosures,
        patients_reached = u.patients_reached + EXCLUDED.patients_reached
    RETURNING * INTO usage;
    IF p_contacts > 0 AND usage.contact_disclosures > coalesce(limits.contact_daily_cap, p_contact_cap) THEN
        RETURN 'contact_cap';
    END IF;
    IF fresh > 0 AND usage.patients_reached > coalesce(limits.patient_daily_cap, p_patient_cap) THEN
        RETURN 'patient_cap';
    END IF;
    IF usage.flag_time IS NULL AND fresh > 0 THEN
        SELECT coalesce(sum(d.patients_reached), 0) / 7.0 INTO norm FROM partner_daily_usage d
        WHERE d.partner_id = p_partner_id AND d.day >= today - 7 AND d.day < today;
        IF usage.patients_reached >= greatest(p_anomaly_min, p_anomaly_factor * norm) THEN
            UPDATE partner_daily_usage SET flag_time = statement_timestamp()
            WHERE partner_id = p_partner_id AND day = today;
            INSERT INTO partner_events (partner_id, kind, detail)
            VALUES (p_partner_id, 'anomaly', format('%s patients reached today against a norm of %s a day',
                                                    usage.patients_reached, round(norm::numeric, 1)));
            IF p_suspend THEN
                INSERT INTO partner_limits (partner_id, suspend_time, suspend_reason)
                VALUES (p_partner_id, statement_timestamp(), 'volume anomaly')
                ON CONFLICT (partner_id) DO UPDATE SET suspend_time = statement_timestamp(),
                    suspend_reason = 'volume anomaly', update_time = statement_timestamp();
                INSERT INTO partner_events (partner_id, kind, detail)
                VALUES (p_partner_id, 'suspended', 'automatic, after a volume anomaly');
                RETURN 'suspended';
            END IF;
            RETURN 'flagged';
        END IF;
    END IF;
    RETURN 'ok';
END
$$;
REVOKE ALL ON FUNCTION charge_partner_usage(uuid, uuid[], integer, integer, integer, double precision, bigint,
    boolean) FROM PUBLIC;
