-- Limits on bulk extraction. Daily caps (contact disclosures, distinct
-- patients reached) hold across every gateway process because they are
-- counted here, in the same transaction as the disclosure they allow: a call
-- over a cap rolls back its own increment. A partner whose daily volume jumps
-- far above its own recent norm is flagged (partner_events), and suspended
-- when the gateway is configured to.

-- Per-partner overrides of the configured defaults (NULL: the default) and
-- the suspension state.
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

-- One row per partner and UTC day: the counters the caps and the anomaly detector read.
CREATE TABLE partner_daily_usage (
    partner_id          uuid NOT NULL REFERENCES partners (id),
    day                 date NOT NULL,
    disclosures         bigint NOT NULL DEFAULT 0,
    contact_disclosures bigint NOT NULL DEFAULT 0,
    patients_reached    bigint NOT NULL DEFAULT 0,
    flag_time           timestamptz,
    PRIMARY KEY (partner_id, day)
);

-- Which patients a partner reached on a day, so each is counted once.
CREATE TABLE partner_daily_patients (
    partner_id uuid NOT NULL,
    day        date NOT NULL,
    patient_id uuid NOT NULL,
    PRIMARY KEY (partner_id, day, patient_id)
);

-- What happened to a partner's standing: anomalies, suspensions, lifts, limit changes.
CREATE TABLE partner_events (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    partner_id uuid NOT NULL REFERENCES partners (id),
    kind       text NOT NULL CHECK (kind IN ('anomaly', 'suspended', 'lifted', 'limits')),
    detail     text NOT NULL DEFAULT '',
    event_time timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX partner_events_partner_idx ON partner_events (partner_id, event_time);

-- Counts one response against the partner's day. Returns 'ok', 'flagged' (this
-- call crossed the anomaly threshold), 'suspended' (and was suspended for it:
-- commit, but send nothing), 'contact_cap' or 'patient_cap' (over a cap: roll back).
CREATE FUNCTION charge_partner_usage(
    p_partner_id uuid, p_patient_ids uuid[], p_disclosures integer, p_contacts integer,
    p_contact_cap integer, p_patient_cap integer, p_anomaly_factor double precision, p_anomaly_min bigint,
    p_suspend boolean
) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
    today   date := (statement_timestamp() AT TIME ZONE 'UTC')::date;
    limits  partner_limits;
    usage   partner_daily_usage;
    fresh   bigint;
    norm    double precision;
BEGIN
    SELECT * INTO limits FROM partner_limits WHERE partner_id = p_partner_id;
    WITH added AS (
        INSERT INTO partner_daily_patients (partner_id, day, patient_id)
        SELECT DISTINCT p_partner_id, today, p FROM unnest(p_patient_ids) AS p WHERE p IS NOT NULL
        ON CONFLICT DO NOTHING
        RETURNING 1
    )
    SELECT count(*) INTO fresh FROM added;
    INSERT INTO partner_daily_usage AS u (partner_id, day, disclosures, contact_disclosures, patients_reached)
    VALUES (p_partner_id, today, p_disclosures, p_contacts, fresh)
    ON CONFLICT (partner_id, day) DO UPDATE SET
        disclosures = u.disclosures + EXCLUDED.disclosures,
        contact_disclosures = u.contact_disclosures + EXCLUDED.contact_disclosures,
        patients_reached = u.patients_reached + EXCLUDED.patients_reached
    RETURNING * INTO usage;
    IF p_contacts > 0 AND usage.contact_disclosures > coalesce(limits.contact_daily_cap, p_contact_cap) THEN
        RETURN 'contact_cap';
    END IF;
    IF fresh > 0 AND usage.patients_reached > coalesce(limits.patient_daily_cap, p_patient_cap) THEN
        RETURN 'patient_cap';
    END IF;
    IF usage.flag_time IS NULL THEN
        SELECT coalesce(sum(d.disclosures), 0) / 7.0 INTO norm FROM partner_daily_usage d
        WHERE d.partner_id = p_partner_id AND d.day >= today - 7 AND d.day < today;
        IF usage.disclosures >= greatest(p_anomaly_min, p_anomaly_factor * norm) THEN
            UPDATE partner_daily_usage SET flag_time = statement_timestamp()
            WHERE partner_id = p_partner_id AND day = today;
            INSERT INTO partner_events (partner_id, kind, detail)
            VALUES (p_partner_id, 'anomaly', format('%s disclosures today against a norm of %s a day',
                                                    usage.disclosures, round(norm::numeric, 1)));
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

REVOKE ALL ON FUNCTION charge_partner_usage(uuid, uuid[], integer, integer, integer, integer, double precision,
    bigint, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION charge_partner_usage(uuid, uuid[], integer, integer, integer, integer, double precision,
    bigint, boolean) TO apptgate_partner;
GRANT SELECT (partner_id, requests_per_second, burst, contact_daily_cap, patient_daily_cap, suspend_time)
    ON partner_limits TO apptgate_partner;
