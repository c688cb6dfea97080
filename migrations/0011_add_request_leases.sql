-- The partner request rate, shared by every gateway process: leases of tokens.
--
-- Each process asks here for a few of a partner's request tokens at a time and spends them
-- without a round trip; a lease lasts until the end of its tenth of a second, so tokens a
-- process leased and did not spend never pile up into a later burst. Two limits decide a grant,
-- on the database's clock (one clock for the fleet):
--   * a token bucket (rate, burst), as the per-process bucket did before;
--   * at most max(rate, burst) tokens leased over the last 11 tenths of a second, so that any
--     one-second window of calls (each spent within its tenth) holds no more than that.
-- A process returns what it left unspent of its last lease with its next question, so that
-- tokens leased and not spent neither count against the window nor leave the bucket.
-- The table is UNLOGGED: it is admission state, not a record, and a crash that empties it only
-- lets each partner start again from a full bucket.

CREATE UNLOGGED TABLE partner_request_leases (
    partner_id uuid PRIMARY KEY REFERENCES partners (id) ON DELETE CASCADE,
    -- The bucket's tokens at lease_time (before the refill since).
    tokens     double precision NOT NULL,
    lease_time timestamptz NOT NULL,
    -- The tenth of a second (since the epoch) that recent's last element counts.
    tenth      bigint NOT NULL,
    -- Tokens leased in each of the last 11 tenths of a second, oldest first.
    recent     integer[] NOT NULL CHECK (cardinality(recent) = 11)
);

-- Lease up to want of a partner's request tokens, returning p_unspent tokens of the caller's
-- lease of tenth p_unspent_tenth. granted: how many (0 when none); tenth: the lease's tenth of a
-- second, which the caller returns its unspent tokens by; expire_in: seconds until the lease
-- ends; retry_in: when granted is 0, the seconds until a token may be granted again.
CREATE FUNCTION lease_request_tokens(
    p_partner uuid, p_rate double precision, p_burst integer, p_want integer, p_unspent integer,
    p_unspent_tenth bigint,
    OUT granted integer, OUT tenth bigint, OUT expire_in double precision, OUT retry_in double precision
)
LANGUAGE plpgsql AS $$
DECLARE
    v_now      timestamptz := clock_timestamp();
    v_epoch    double precision := extract(epoch FROM v_now);
    v_tenth    bigint := floor(v_epoch * 10);
    v_window   integer := greatest(ceil(p_rate)::integer, p_burst);
    v_row      partner_request_leases%ROWTYPE;
    v_tokens   double precision;
    v_recent   integer[];
    v_used     integer;
    v_shift    bigint;
    v_oldest   integer;
BEGIN
    SELECT * INTO v_row FROM partner_request_leases WHERE partner_id = p_partner FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO partner_request_leases AS l VALUES (p_partner, p_burst, v_now, v_tenth, array_fill(0, ARRAY[11]))
        ON CONFLICT (partner_id) DO UPDATE SET partner_id = l.partner_id  -- a racing first lease: lock its row
        RETURNING * INTO v_row;
    END IF;
    v_tokens := least(p_burst::double precision,
                      v_row.tokens + greatest(0, extract(epoch FROM v_now - v_row.lease_time)) * p_rate
                      + greatest(p_unspent, 0));
    v_shift := v_tenth - v_row.tenth;
    IF v_shift >= 11 THEN
        v_recent := array_fill(0, ARRAY[11]);
    ELSIF v_shift > 0 THEN
        v_recent := v_row.recent[v_shift + 1 : 11] || array_fill(0, ARRAY[v_shift::integer]);
    ELSE
        v_recent := v_row.recent;  -- the same tenth (or a clock that stepped back: count it as the same)
        v_tenth := v_row.tenth;
    END IF;
    -- The returned tokens leave the window too, while their tenth is still in it.
    IF p_unspent > 0 AND p_unspent_tenth BETWEEN v_tenth - 10 AND v_tenth THEN
        v_recent[p_unspent_tenth - v_tenth + 11] :=
            greatest(0, v_recent[p_unspent_tenth - v_tenth + 11] - p_unspent);
    END IF;
    SELECT coalesce(sum(n), 0) INTO v_used FROM unnest(v_recent) AS n;
    granted := greatest(0, least(p_want, floor(v_tokens)::integer, v_window - v_used));
    v_recent[11] := v_recent[11] + granted;
    UPDATE partner_request_leases
       SET tokens = v_tokens - granted, lease_time = v_now, tenth = v_tenth, recent = v_recent
     WHERE partner_id = p_partner;
    tenth := v_tenth;
    expire_in := (v_tenth + 1) / 10.0 - v_epoch;
    retry_in := 0;
    IF granted = 0 THEN
        -- The later of: the bucket holding a token, and the oldest leased tenth leaving the window.
        retry_in := greatest(0, (1 - v_tokens) / p_rate);
        IF v_used >= v_window THEN
            SELECT min(i) INTO v_oldest FROM generate_subscripts(v_recent, 1) AS i WHERE v_recent[i] > 0;
            retry_in := greatest(retry_in, (v_tenth + v_oldest) / 10.0 - v_epoch);
        END IF;
    END IF;
END
$$;
REVOKE ALL ON FUNCTION lease_request_tokens(uuid, double precision, integer, integer, integer, bigint) FROM PUBLIC;
