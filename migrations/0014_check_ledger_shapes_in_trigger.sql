-- The shapes a ledger record may have, checked by a trigger instead of nine CHECK constraints.
--
-- PostgreSQL reads a table's CHECK constraints back from the catalog and plans them again for
-- every statement that writes the table: the nine on disclosures took about 45 µs of a 113 µs
-- record statement (bench/record_cost.py), and the contact statement, which inserts once per
-- call it records, paid them once per call. A PL/pgSQL trigger plans its conditions once per
-- connection. The conditions are the constraints' own (0005, widened by 0008 and 0012), each
-- refused as its constraint was (SQLSTATE 23514, the constraint's name in the error); like the
-- constraints they hold on UPDATE too, and whatever session_replication_role says (ENABLE
-- ALWAYS), so a session writing past the append-only triggers still meets them. Setting them
-- aside takes the table's owner, as dropping a constraint did.

CREATE FUNCTION check_disclosure_shape() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    -- A condition passes unless it is false (NULL passes), as a CHECK constraint does.
    violated text := CASE
        WHEN (NEW.view IN (1, 2)) IS FALSE THEN 'disclosures_view_check'
        WHEN (NEW.outcome IN (1, 2, 3, 4, 5)) IS FALSE THEN 'disclosures_outcome_check'
        -- A partner's key on every partner call; none on the platform's own use.
        WHEN ((NEW.outcome <> 5 AND NEW.key_id ~ '^pk_[a-z2-7]{16}$')
              OR (NEW.outcome = 5 AND NEW.key_id = '')) IS FALSE THEN 'disclosures_key_check'
        WHEN (NEW.rpc ~ '^/[A-Za-z0-9_.]+/[A-Za-z0-9_]+$') IS FALSE THEN 'disclosures_rpc_check'
        WHEN (NEW.trace_id ~ '^([0-9a-f]{32})?$') IS FALSE THEN 'disclosures_trace_check'
        WHEN (NEW.client_cert ~ '^([0-9a-f]{64})?$') IS FALSE THEN 'disclosures_client_cert_check'
        -- A refusal, and only a refusal, with its reason.
        WHEN ((NEW.outcome = 2) = (NEW.denial_reason <> '')) IS FALSE THEN 'disclosures_refusal_check'
        -- Contact fields and a consent only in a contact view; a contact disclosure names its
        -- consent; a request names none; an internal use reads fields under no consent.
        WHEN ((NEW.view = 1 AND NEW.contact_fields = '{}' AND NEW.consent_id IS NULL AND NEW.outcome IN (1, 2))
              OR (NEW.view = 2 AND NEW.outcome = 2)
              OR (NEW.view = 2 AND NEW.outcome IN (1, 4) AND NEW.consent_id IS NOT NULL)
              OR (NEW.view = 2 AND NEW.outcome = 3 AND NEW.consent_id IS NULL)
              OR (NEW.view = 2 AND NEW.outcome = 5 AND NEW.consent_id IS NULL AND NEW.contact_fields <> '{}'))
             IS FALSE THEN 'disclosures_contact_check'
        -- Items of its own, or a reference, never both, never neither.
        WHEN ((NEW.items_of IS NULL AND NEW.items_digest IS NULL
               AND cardinality(NEW.appointment_ids) > 0
               AND cardinality(NEW.patient_ids) = cardinality(NEW.appointment_ids)
               AND cardinality(NEW.requested_ids) = cardinality(NEW.appointment_ids))
              OR (NEW.items_of IS NOT NULL AND NEW.items_digest IS NOT NULL
                  AND NEW.requested_ids IS NULL AND NEW.appointment_ids IS NULL AND NEW.patient_ids IS NULL))
             IS FALSE THEN 'disclosures_items_check'
    END;
BEGIN
    IF violated IS NOT NULL THEN
        RAISE EXCEPTION 'new row for relation "disclosures" violates check constraint "%"', violated
            USING ERRCODE = 'check_violation', CONSTRAINT = violated, TABLE = 'disclosures';
    END IF;
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION check_disclosure_shape() FROM PUBLIC;

CREATE TRIGGER disclosures_checked BEFORE INSERT OR UPDATE ON disclosures
    FOR EACH ROW EXECUTE FUNCTION check_disclosure_shape();
ALTER TABLE disclosures ENABLE ALWAYS TRIGGER disclosures_checked;

ALTER TABLE disclosures
    DROP CONSTRAINT disclosures_view_check,
    DROP CONSTRAINT disclosures_outcome_check,
    DROP CONSTRAINT disclosures_key_check,
    DROP CONSTRAINT disclosures_rpc_check,
    DROP CONSTRAINT disclosures_trace_check,
    DROP CONSTRAINT disclosures_client_cert_check,
    DROP CONSTRAINT disclosures_refusal_check,
    DROP CONSTRAINT disclosures_contact_check,
    DROP CONSTRAINT disclosures_items_check;
