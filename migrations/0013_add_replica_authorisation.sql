-- Reads on streaming replicas, decisions on the primary.
--
-- A partner's basic reads may run on a replica (APPTGATE_READ_REPLICA_URLS), whose copy of the
-- keys, suspensions and grants lags the primary's. Before such a response is recorded and sent,
-- the gateway asks the primary, in one statement as the partner role, whether the key is still
-- live, the partner not suspended, and which of the response's practitioners still grant it
-- access; a response the primary does not authorise whole is read again on the primary.

-- The practitioners among p_practitioner_ids that grant the key's partner access now; AG401 or
-- AG403 as partner_admit.
CREATE FUNCTION partner_granted(p_key_id text, p_credential bytea, p_practitioner_ids uuid[]) RETURNS uuid[]
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
    partner uuid := partner_admit(p_key_id, p_credential);
BEGIN
    RETURN ARRAY(
        SELECT g.practitioner_id FROM practitioner_grants g
        WHERE g.partner_id = partner AND g.revoke_time IS NULL AND g.practitioner_id = ANY (p_practitioner_ids));
END
$$;
REVOKE ALL ON FUNCTION partner_granted(text, bytea, uuid[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION partner_granted(text, bytea, uuid[]) TO apptgate_partner;
