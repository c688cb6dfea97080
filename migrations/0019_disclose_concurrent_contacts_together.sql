-- The contact disclosures of concurrent calls checked, counted and recorded in one statement.
--
-- GetAppointmentContact ran disclose_consented_contact (0013) as a statement
-- of its own: one transaction, one WAL flush and one lock on the partner's
-- daily counter row per call, held until that call's commit. Measured on the
-- bench world (bench/run.py, one gateway process, c=16): 0.70-0.77 ms of
-- PostgreSQL CPU per contact call against 0.43-0.48 ms for GetAppointment,
-- whose records share a commit since 0017, with ~0.5 backends waiting on
-- Lock/transactionid (the counter row) on average. The gateway now hands the
-- contact disclosures of the calls waiting at the same moment to this
-- function (service/recorder.py), as it does basic views: one statement, one
-- transaction, one flush and one counter lock per partner for all of them,
-- and each answer still leaves only once its record is durable. Measured
-- after (same bench, two alternating runs of each version): 0.63-0.64 ms of
-- PostgreSQL CPU per contact call against 0.73-0.77 ms. Alone, a call costs
-- a little more than with disclose_consented_contact (pgbench, prepared
-- statements: 0.57 against 0.52 ms); three together cost 0.84 ms against
-- 1.60 ms for three single statements.
--
-- Per call, exactly what disclose_consented_contact did: the consent is read
-- once (read_consented_contact); one that is not live returns its state and
-- fields and has nothing counted or recorded (the gateway records the
-- refusal); a live one releases the fields both the token and the consent
-- name, and its record is the record disclose_consented_contact wrote. Each
-- partner of the group is charged once for all its live calls, partners in
-- the order given (sorted by the caller). Over a daily cap the whole statement
-- fails with AG429, the cap in DETAIL and the partner in HINT, as
-- record_partner_disclosures does: nothing is counted or recorded, and the
-- gateway writes the group again without that partner, whose calls it then
-- writes one by one so that the cap stays exact. A partner suspended by its
-- charge has nothing recorded and gets no value.
--
-- disclose_consented_contact stays: a gateway of the previous version still
-- calls it while a rolling upgrade is under way.

-- What one call is answered: its consent's state, or the charge's outcome, and the released values.
CREATE TYPE contact_disclosure AS (
    state text, fields smallint[],
    sealed_given_name bytea, sealed_family_name bytea, sex smallint, sealed_phone bytea, sealed_email bytea,
    given_name text, family_name text, phone text, email text
);

CREATE FUNCTION disclose_consented_contacts(
    -- One element per call; p_token_fields[i] is the array literal of the fields call i's token names.
    p_call_partners uuid[], p_key_ids text[], p_rpcs text[], p_trace_ids text[], p_requested_ids text[],
    p_appointment_ids uuid[], p_patient_ids uuid[], p_consent_ids uuid[], p_token_fields text[],
    -- One element per partner to charge, and its terms.
    p_partners uuid[], p_contact_caps integer[], p_patient_caps integer[], p_anomaly_factors double precision[],
    p_anomaly_mins bigint[], p_suspends boolean[]
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
    outcomes  text[] := '{}';
    suspended uuid[] := '{}';
    patients  uuid[];
    charged   text;
BEGIN
    IF cardinality(p_key_ids) IS DISTINCT FROM calls OR cardinality(p_rpcs) IS DISTINCT FROM calls
       OR cardinality(p_trace_ids) IS DISTINCT FROM calls OR cardinality(p_requested_ids) IS DISTINCT FROM calls
       OR cardinality(p_appointment_ids) IS DISTINCT FROM calls OR cardinality(p_patient_ids) IS DISTINCT FROM calls
       OR cardinality(p_consent_ids) IS DISTINCT FROM calls OR cardinality(p_token_fields) IS DISTINCT FROM calls THEN
        RAISE EXCEPTION 'disclose_consented_contacts: call arrays of different lengths';
    END IF;
    -- Each call's consent, read once: its state and the values of the fields both it and the token name.
    FOR k IN 1 .. calls LOOP
        SELECT * INTO c FROM read_consented_contact(p_consent_ids[k], p_call_partners[k], p_patient_ids[k]);
        IF NOT FOUND THEN  -- the patient row vanished: as an unknown consent
            seen[k] := ROW('unknown', '{}', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)::contact_disclosure;
        ELSIF c.state <> 'live' THEN
            seen[k] := ROW(c.state, c.fields, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)::contact_disclosure;
        ELSE
            granted := ARRAY(SELECT DISTINCT f FROM unnest(c.fields) AS f
                             WHERE f = ANY (p_token_fields[k]::smallint[]) ORDER BY f);
            seen[k] := ROW('live', granted,
                           CASE WHEN 1 = ANY (granted) THEN c.sealed_given_name END,
                           CASE WHEN 1 = ANY (granted) THEN c.sealed_family_name END,
                           CASE WHEN 2 = ANY (granted) THEN c.sex END,
                           CASE WHEN 3 = ANY (granted) THEN c.sealed_phone END,
                           CASE WHEN 4 = ANY (granted) THEN c.sealed_email END,
                           CASE WHEN 1 = ANY (granted) THEN c.given_name END,
                           CASE WHEN 1 = ANY (granted) THEN c.family_name END,
                           CASE WHEN 3 = ANY (granted) THEN c.phone END,
                           CASE WHEN 4 = ANY (granted) THEN c.email END)::contact_disclosure;
        END IF;
    END LOOP;
    FOR i IN 1 .. coalesce(cardinality(p_partners), 0) LOOP
        patients := '{}';
        FOR k IN 1 .. calls LOOP
            IF p_call_partners[k] = p_partners[i] AND (seen[k]).state = 'live' THEN
                patients := patients || p_patient_ids[k];
            END IF;
        END LOOP;
        charged := 'ok';
        IF cardinality(patients) > 0 THEN
            charged := charge_partner_usage(p_partners[i], patients, cardinality(patients), cardinality(patients),
                                            p_contact_caps[i], p_patient_caps[i], p_anomaly_factors[i],
                                            p_anomaly_mins[i], p_suspends[i]);
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
        IF r.state = 'live' THEN
            IF p_call_partners[k] = ANY (suspended) THEN
                r := ROW('suspended', '{}', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)::contact_disclosure;
            ELSE
                INSERT INTO disclosures (partner_id, key_id, view, contact_fields, consent_id, rpc, trace_id,
                                         disclose_time, outcome, denial_reason, requested_ids, appointment_ids,
                                         patient_ids)
                VALUES (p_call_partners[k], p_key_ids[k], 2, r.fields, p_consent_ids[k], p_rpcs[k],
                        coalesce(p_trace_ids[k], ''), statement_timestamp(), 1, '', ARRAY[p_requested_ids[k]],
                        ARRAY[p_appointment_ids[k]], ARRAY[p_patient_ids[k]]);
                r.state := outcomes[array_position(p_partners, p_call_partners[k])];
            END IF;
        END IF;
        RETURN NEXT r;
    END LOOP;
END
$$;
-- The gateway calls it on its own (owner) path; the partner role cannot.
REVOKE ALL ON FUNCTION disclose_consented_contacts(uuid[], text[], text[], text[], text[], uuid[], uuid[], uuid[],
    text[], uuid[], integer[], integer[], double precision[], bigint[], boolean[]) FROM PUBLIC;
