"""When and how long to wait before sending a failed call again. Pure: no I/O, no clock.

Only ``UNAVAILABLE`` is retried, and only for calls that are safe to repeat
(every partner call reads; on the internal services, reads only). The wait
before retry ``n`` (1, 2, …) is *exponential backoff with full jitter*::

    cap(n)  = min(max_backoff, initial_backoff * multiplier ** (n - 1))
    wait(n) = max(server_delay, uniform(0, cap(n)))

where ``server_delay`` is the server's ``google.rpc.RetryInfo`` delay, when it
sent one: the server knows better than the client when it will be back, and
the jitter still spreads out clients that were refused together. Retries stop
after ``max_attempts`` sends, or as soon as the next wait would outlast the
call's deadline: the deadline covers all attempts, so a retried call never
takes longer than one that is not.

A watch (a change-feed stream) is resumed with the same waits, but bounded by
time rather than by a count (:func:`resume_delay`): it keeps trying for its
``resume_timeout`` seconds, however many attempts that takes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from apptgate_client.errors import ApptgateError, Unavailable


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a client retries ``UNAVAILABLE``. Immutable; pass one to a client's constructor.

    ``max_attempts`` counts every send, the first included (1 turns retries
    off). Delays are in seconds. Raises ``ValueError`` on nonsensical values.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_backoff <= 0 or self.max_backoff < self.initial_backoff:
            raise ValueError("backoffs must be positive, with max_backoff >= initial_backoff")
        if self.multiplier < 1:
            raise ValueError("multiplier must be at least 1")

    def cap(self, retry: int) -> float:
        """The upper bound of the jittered wait before retry number ``retry`` (1 for the first retry)."""
        exponent = min(retry - 1, 64)  # past this the cap is max_backoff anyway; avoids float overflow
        return float(min(self.max_backoff, self.initial_backoff * self.multiplier**exponent))

    def budget(self) -> float:
        """The longest the client can wait in total between the attempts of one call (server delays aside)."""
        return sum(self.cap(n) for n in range(1, self.max_attempts))


#: A policy that never retries.
NO_RETRY = RetryPolicy(max_attempts=1)


def next_delay(
    policy: RetryPolicy,
    error: ApptgateError,
    *,
    attempt: int,
    remaining: float,
    rng: random.Random,
    retryable: bool | None = None,
) -> float | None:
    """Return how long to wait before sending again after ``attempt`` failed with ``error``, or ``None`` to give up.

    ``remaining`` is the time left before the call's deadline, in seconds.
    ``retryable`` overrides the default rule (only ``UNAVAILABLE`` is retried).
    """
    if retryable is None:
        retryable = isinstance(error, Unavailable)
    if not retryable or attempt >= policy.max_attempts:
        return None
    delay = _wait(policy, error, attempt, rng)
    if delay >= remaining:
        return None
    return delay


def resume_delay(
    policy: RetryPolicy, error: ApptgateError, *, attempt: int, remaining: float, rng: random.Random
) -> float | None:
    """Return how long a watch waits before reopening after ``attempt`` failed, or ``None`` to give up.

    The wait is the one :func:`next_delay` computes, but only time bounds it:
    ``remaining`` is what is left of the watch's ``resume_timeout``, and
    ``policy.max_attempts`` does not apply. The caller decides whether
    ``error`` may be resumed at all.
    """
    delay = _wait(policy, error, attempt, rng)
    if delay >= remaining:
        return None
    return delay


def _wait(policy: RetryPolicy, error: ApptgateError, attempt: int, rng: random.Random) -> float:
    # Full jitter, but never sooner than the server's RetryInfo asks.
    return max(error.retry_delay or 0.0, rng.uniform(0.0, policy.cap(attempt)))
