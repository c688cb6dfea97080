-- The only way the partner path reads contact details: by a live consent that
-- names this partner and this patient, and only the fields it covers. The
-- consent's revocation is checked by the same statement (one primary-key lookup).

CREATE FUNCTION read_consented_contact(p_consent_id uuid, p_partner_id uuid, p_patient_id uuid)
RETURNS TABLE (state text, fields smallint[], given_name text, family_name text, sex smallint, phone text, email text)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
    c consents;
BEGIN
    SELECT * INTO c FROM consents WHERE id = p_consent_id;
    IF NOT FOUND OR c.partner_id <> p_partner_id OR c.patient_id <> p_patient_id THEN
        RETURN QUERY SELECT 'unknown'::text, '{}'::smallint[], NULL::text, NULL::text, NULL::smallint, NULL::text, NULL::text;
    ELSIF c.revoke_time IS NOT NULL THEN
        RETURN QUERY SELECT 'revoked'::text, c.fields, NULL::text, NULL::text, NULL::smallint, NULL::text, NULL::text;
    ELSIF c.expire_time <= statement_timestamp() THEN
        RETURN QUERY SELECT 'expired'::text, c.fields, NULL::text, NULL::text, NULL::smallint, NULL::text, NULL::text;
    ELSE
        RETURN QUERY
        SELECT 'live'::text, c.fields,
               CASE WHEN 1 = ANY (c.fields) THEN p.given_name END,
               CASE WHEN 1 = ANY (c.fields) THEN p.family_name END,
               CASE WHEN 2 = ANY (c.fields) THEN p.sex END,
               CASE WHEN 3 = ANY (c.fields) THEN p.phone END,
               CASE WHEN 4 = ANY (c.fields) THEN p.email END
        FROM patients p WHERE p.id = p_patient_id;
    END IF;
END
$$;
