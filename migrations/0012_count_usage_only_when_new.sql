-- charge_partner_usage no longer touches the partner's daily counter row when
-- a response reaches no new patient and discloses no contact: re-listing an
-- agenda (what sync tools do all day) takes no lock, where every call used to
-- queue on that row until its commit. The anomaly detector follows distinct
-- patients reached (what a bulk extraction grows) rather than disclosures;
-- `disclosures` stays in the table for history and is no longer counted here
-- (the ledger has the exact figure).

CREATE OR REPLACE FUNCTION charge_partner_usage(
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
    WITH added AS (
        INSERT INTO partner_daily_patients (partner_id, day, patient_id)
        SELECT DISTINCT p_partner_id, today, p FROM unnest(p_patient_ids) AS p WHERE p IS NOT NULL
        ON CONFLICT DO NOTHING
        RETURNING 1
    )
    SELECT count(*) INTO fresh FROM added;
    IF fresh = 0 AND p_contacts = 0 THEN
        RETURN 'ok';  -- nothing new to count: no counter row, no lock
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
