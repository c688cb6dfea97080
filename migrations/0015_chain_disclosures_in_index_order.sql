-- The sequencer reads its next batch in index order, whatever the statistics say.
--
-- chain_disclosures takes the oldest unchained records, `WHERE seq IS NULL …
-- ORDER BY id LIMIT n`, which disclosures_unchained_idx (a partial index on id)
-- answers by reading n entries in order. With stale statistics (autovacuum off
-- or behind: the soak found it so on the CI machine), the planner believed the
-- backlog tiny and chose a bitmap scan of every unchained row followed by a
-- sort: each pass then read the whole backlog (2.2 s for 5,000 records out of
-- a 2M-record backlog), the backlog grew faster than it was chained, and every
-- pass got slower. With sorts and bitmap scans off inside this function only,
-- the one plan left is the ordered index scan: the same pass takes 0.33 s,
-- whatever the backlog.

ALTER FUNCTION chain_disclosures(integer) SET enable_sort = off;
ALTER FUNCTION chain_disclosures(integer) SET enable_bitmapscan = off;
