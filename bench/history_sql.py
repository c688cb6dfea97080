"""The SQL of ``bench/patient_history.py`` besides the service's own: the ledger's census and the naive baseline."""

#: Items per patient over the whole ledger, references included (each record holding the patient counts once
#: per item, plus once per record repeating it).
CENSUS_SQL = """
WITH refs AS (SELECT items_of, count(*) AS n FROM disclosures WHERE items_of IS NOT NULL GROUP BY items_of)
SELECT u.p AS patient_id, sum(1 + coalesce(refs.n, 0))::bigint AS items
FROM disclosures d
LEFT JOIN refs ON refs.items_of = d.id
CROSS JOIN LATERAL unnest(d.patient_ids) AS u(p)
WHERE d.patient_ids IS NOT NULL AND u.p IS NOT NULL
GROUP BY u.p
"""

#: The baseline: the history's groups from the ``disclosure_items`` view, filtered by patient (a scan of the ledger).
NAIVE_SQL = """
SELECT i.partner_id, p.display_name, i.appointment_id, a.start_time, pr.display_name, pr.specialty, i.view,
       i.contact_fields, i.outcome, i.denial_reason, i.consent_id, c.purpose, min(i.disclose_time) AS first_time,
       max(i.disclose_time) AS last_time, count(*) AS n
FROM disclosure_items i
JOIN partners p ON p.id = i.partner_id
LEFT JOIN appointments a ON a.id = i.appointment_id
LEFT JOIN practitioners pr ON pr.id = a.practitioner_id
LEFT JOIN consents c ON c.id = i.consent_id
WHERE i.patient_id = $1 AND i.disclose_time >= $2 AND i.disclose_time < $3
GROUP BY i.partner_id, p.display_name, i.appointment_id, a.start_time, pr.display_name, pr.specialty, i.view,
         i.contact_fields, i.outcome, i.denial_reason, i.consent_id, c.purpose
ORDER BY last_time DESC
LIMIT $4
"""
