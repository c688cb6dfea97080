"""How a partner call is admitted (service.access.gate): what is asked of the database, and what is not.

The gate runs over a real database whose statements are observed (the
pool's query observer, as tracing uses it), with a clock the test moves, so
that "answered from memory" and "limited per address" are facts, not timings.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from harness import World

from service.access.gate import Caller, PartnerGate
from service.access.limits import ExtractionGuard
from service.access.request_rate import FleetRate
from service.errors import ResourceExhausted, Unauthenticated
from service.settings import Settings
from service.store import request_leases
from service.store.database import Database, partner_login_dsn
from service.telemetry.tracing import Telemetry

UNKNOWN = "pk_" + "a" * 16 + "." + "b" * 43
PEER = "ipv4:192.0.2.7"


class Clock:
    """A clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Statements(list[str]):
    """Every statement the pools ran, in order."""

    def __call__(self, query: str, _seconds: float, _error: BaseException | None) -> None:
        self.append(query)

    def authentications(self) -> int:
        return sum("partner_authenticate" in query for query in self)


@pytest.fixture
async def observed(database_dsn: str) -> AsyncIterator[tuple[Database, Statements]]:
    statements = Statements()
    database = await Database.connect(
        database_dsn,
        min_size=1,
        max_size=2,
        partner_dsn=partner_login_dsn(database_dsn),
        require_partner_login=True,
        on_query=statements,
    )
    try:
        yield database, statements
    finally:
        await database.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def gate(observed: tuple[Database, Statements], settings: Settings, clock: Clock) -> PartnerGate:
    database = observed[0]
    rate = FleetRate(request_leases.source(database, 5.0), clock=clock)
    return PartnerGate(database, ExtractionGuard(settings, Telemetry(), clock=clock), rate, clock=clock)


def _bearer(secret: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {secret}")]


async def _refusal(gate: PartnerGate, secret: str, peer: str = PEER) -> tuple[str, str]:
    with pytest.raises((Unauthenticated, ResourceExhausted)) as caught:
        await gate.admit(Caller(_bearer(secret), peer))
    return type(caught.value).__name__, caught.value.reason


async def test_a_key_seen_verify_is_admitted_from_memory(
    world: World, gate: PartnerGate, observed: tuple[Database, Statements]
) -> None:
    partner = await world.partner("Remembered")
    _, statements = observed

    first, _ = await gate.admit(Caller(_bearer(partner.secret), PEER))
    second, _ = await gate.admit(Caller(_bearer(partner.secret), PEER))

    assert str(first.partner_id) == partner.partner_id and second == first
    assert statements.authentications() == 1


async def test_a_wrong_secret_on_a_key_seen_verify_takes_the_path_of_an_unknown_key(
    world: World, gate: PartnerGate, observed: tuple[Database, Statements]
) -> None:
    partner = await world.partner("Guessed")
    _, statements = observed
    await gate.admit(Caller(_bearer(partner.secret), PEER))
    wrong = partner.secret[:-1] + ("A" if partner.secret[-1] != "A" else "B")

    before = statements.authentications()
    wrong_answer = await _refusal(gate, wrong)
    after_wrong = statements.authentications()
    unknown_answer = await _refusal(gate, UNKNOWN)

    assert wrong_answer == unknown_answer == ("Unauthenticated", "INVALID_CREDENTIALS")
    # Both asked the database once: a wrong secret is not told apart from an unknown key locally.
    assert (after_wrong - before, statements.authentications() - after_wrong) == (1, 1)


async def test_a_key_that_failed_is_answered_from_memory_for_a_while(
    gate: PartnerGate, observed: tuple[Database, Statements], clock: Clock
) -> None:
    _, statements = observed

    answers = [await _refusal(gate, UNKNOWN) for _ in range(3)]
    remembered = statements.authentications()
    clock.now += 61
    answers.append(await _refusal(gate, UNKNOWN))

    assert set(answers) == {("Unauthenticated", "INVALID_CREDENTIALS")}
    assert (remembered, statements.authentications()) == (1, 2)


async def test_an_address_that_fails_too_often_is_refused_unheard_and_others_are_not(
    world: World, gate: PartnerGate, observed: tuple[Database, Statements], clock: Clock
) -> None:
    partner = await world.partner("Neighbour")
    _, statements = observed
    guesses = [f"pk_{'c' * 16}.{n:043d}" for n in range(25)]

    answers = [await _refusal(gate, guess) for guess in guesses]
    asked = statements.authentications()
    from_elsewhere, _ = await gate.admit(Caller(_bearer(partner.secret), "ipv4:198.51.100.9"))
    clock.now += 10  # the address's allowance refills
    later = await _refusal(gate, UNKNOWN)

    assert answers[:20] == [("Unauthenticated", "INVALID_CREDENTIALS")] * 20
    assert answers[20:] == [("ResourceExhausted", "AUTHENTICATION_RATE_LIMITED")] * 5
    assert asked == 20  # the limited attempts asked nothing
    assert str(from_elsewhere.partner_id) == partner.partner_id
    assert later == ("Unauthenticated", "INVALID_CREDENTIALS")
