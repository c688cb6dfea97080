-- Row-level security without a function call per row: current_partner_id()
-- becomes inlinable.
--
-- Migration 0008 declared it with `SET search_path = pg_catalog`. A function
-- with a SET clause is never inlined by the planner: every evaluation goes
-- through the function manager, which saves, sets and restores search_path
-- around the call. The policies of 0008 evaluate it for every row they
-- filter: each grant row the policy on practitioner_grants checks, once in
-- the query and once more inside the subquery of the policy on appointments.
-- Measured on the 100k bench world as apptgate_partner (median server-side
-- execution, docs/defense-cost.md): GetAppointment's read 0.23-0.25 ms with
-- the function as it was, 0.07 ms inlined, 0.03-0.04 ms with row-level
-- security off; the listing 0.9-1.8 ms as it was, 0.7-1.0 ms inlined,
-- 0.8-1.0 ms off.
--
-- The new body depends on no search_path at all (every function, operator
-- and type is schema-qualified), so the SET clause is not needed for safety,
-- and without it the planner inlines the expression into each policy: the
-- setting becomes an index condition read once per scan, and a cheap
-- expression where it filters rows. Same result as before: the partner bound
-- with set_config(..., true); NULL when unset ('' after a transaction, or
-- never set in the session), so the policies match nothing.
CREATE OR REPLACE FUNCTION current_partner_id() RETURNS uuid
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN pg_catalog.current_setting('apptgate.partner_id', true) OPERATOR(pg_catalog.=) '' THEN NULL
        ELSE CAST(pg_catalog.current_setting('apptgate.partner_id', true) AS pg_catalog.uuid)
    END
$$;
