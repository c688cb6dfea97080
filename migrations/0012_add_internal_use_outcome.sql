-- The platform's own use of patients' contact details is a ledger record too: outcome 5
-- (internal use). `audit breach-report --include-contact` reads the names and emails of the
-- patients a partner's incident reached, to write to them (GDPR Art. 34); that reading is
-- recorded, hash-chained and verified like every disclosure, under the partner whose incident
-- it concerns, so the patients' own histories show it and an auditor can find it.
--
-- Such a record was made by no partner call: it has no key ('' instead of a key id) and no
-- consent, its method names the command (/apptgate.cli.Audit/BreachReport), and each of its
-- items is a patient (the patient id as the requested id, no appointment). Every reader of
-- partner disclosures counts outcome 1 (and 3) only, so the breach report, the daily counters
-- and the privacy events' triggers leave it out.

ALTER TABLE disclosures DROP CONSTRAINT disclosures_outcome_check;
ALTER TABLE disclosures ADD CONSTRAINT disclosures_outcome_check CHECK (outcome IN (1, 2, 3, 4, 5));
-- A partner's key on every partner call; none on the platform's own use.
ALTER TABLE disclosures DROP CONSTRAINT disclosures_key_check;
ALTER TABLE disclosures ADD CONSTRAINT disclosures_key_check CHECK (
    (outcome <> 5 AND key_id ~ '^pk_[a-z2-7]{16}$') OR (outcome = 5 AND key_id = '')
);
-- An internal use reads contact fields (view 2), under no consent: the platform's duty to
-- notify is its ground, not the patient's consent.
ALTER TABLE disclosures DROP CONSTRAINT disclosures_contact_check;
ALTER TABLE disclosures ADD CONSTRAINT disclosures_contact_check CHECK (
    (view = 1 AND contact_fields = '{}' AND consent_id IS NULL AND outcome IN (1, 2))
    OR (view = 2 AND outcome = 2)
    OR (view = 2 AND outcome IN (1, 4) AND consent_id IS NOT NULL)
    OR (view = 2 AND outcome = 3 AND consent_id IS NULL)
    OR (view = 2 AND outcome = 5 AND consent_id IS NULL AND contact_fields <> '{}')
);
