"""The Python client's change feed across real gateway processes: one restarted, and two restarted in turn.

Each gateway is a ``python -m service serve`` subprocess on fixed ports, over
the test's database, with the same secrets (a resume token sealed by one
process opens on any other). Changes are made through the internal API of an
in-process gateway that is never restarted, one at a time, so their commit
order is the order they were made in; every stream must receive exactly the
changes of what it watches, once each, in that order.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import harness
import pytest
from apptgate_client import AsyncAppointmentWatch, AsyncPartnerClient, RetryPolicy
from client_world import WEEK_START

from service.access.consent_tokens import SigningKey
from service.crypto.sealing import DataKeyring

#: The data key of every gateway of these tests, in-process and subprocesses alike.
DATA_KEY = os.urandom(32)
#: Quick retries: the tests wait on events, and the budget is time (the default 60 s), not a count.
QUICK = RetryPolicy(initial_backoff=0.05, max_backoff=0.5)


@pytest.fixture
def data_keys() -> DataKeyring:
    """The in-process gateway's data keys: the subprocesses' own, so they open what it seals."""
    return DataKeyring([(1, DATA_KEY)])


@dataclass
class Served:
    """One ``python -m service serve`` process on fixed ports, which a test stops and starts again."""

    env: dict[str, str]
    partner_port: int
    process: asyncio.subprocess.Process | None = None
    stderr: list[str] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the process; return once it logged that it serves (raise with its stderr if it ended)."""
        self.process = process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service",
            "serve",
            env=self.env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        ready = asyncio.Event()

        async def read() -> None:
            assert process.stderr is not None
            while line := (await process.stderr.readline()).decode():
                self.stderr.append(line)
                if '"serving: partner on' in line:
                    ready.set()
            ready.set()  # it ended: the waiter looks at why

        self._reader = asyncio.create_task(read())
        async with asyncio.timeout(60):
            await ready.wait()
        assert process.returncode is None, "".join(self.stderr[-20:])

    async def stop(self) -> None:
        """SIGTERM: the process drains and exits 0."""
        assert self.process is not None and self._reader is not None
        self.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            code = await self.process.wait()
            await self._reader
        assert code == 0, "".join(self.stderr[-20:])

    async def kill(self) -> None:
        """End the process whatever its state (the tests' cleanup)."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        if self._reader is not None:
            self._reader.cancel()


@pytest.fixture
async def fleet(database_dsn: str, tmp_path: Path) -> AsyncIterator[list[Served]]:
    """Two gateway processes, not started, sharing the test's database and secrets (``fleet[0].start()``)."""
    secrets = {
        "APPTGATE_SERVER_SECRET": base64.b64encode(os.urandom(32)).decode(),
        "APPTGATE_SIGNING_KEY": SigningKey.generate().secret_paserk(),
        "APPTGATE_DATA_KEY": harness.data_key_text((1, DATA_KEY)),
    }
    served = []
    for n in range(2):
        port = harness.free_port()
        env = harness.environment(
            DATABASE_URL=database_dsn,
            APPTGATE_WORKERS="1",
            APPTGATE_DATA_DIR=str(tmp_path / f"gateway-{n}"),
            APPTGATE_INTERNAL_TOKEN=harness.INTERNAL_TOKEN,
            APPTGATE_PARTNER_ADDR=f"127.0.0.1:{port}",
            APPTGATE_INTERNAL_ADDR=f"127.0.0.1:{harness.free_port()}",
            APPTGATE_SHUTDOWN_GRACE="60",  # the stop returns early only because the streams end
            APPTGATE_PARTNER_RPS="1000",
            APPTGATE_PARTNER_BURST="1000",
            **secrets,
        )
        served.append(Served(env, port))
    try:
        yield served
    finally:
        for gateway in served:
            await gateway.kill()


def start_of(minute: int) -> str:
    """The start time of the writer's change number ``minute``, as the change feed gives it."""
    return f"{WEEK_START + timedelta(days=2, minutes=minute):%Y-%m-%dT%H:%M:%SZ}"


class Writer:
    """Books appointments through the in-process gateway's internal API, one at a time, and logs them."""

    def __init__(self, world: harness.World, patient_id: str) -> None:
        self.world = world
        self.patient_id = patient_id
        self.made: list[tuple[str, str]] = []  # (practitioner, start), in commit order

    async def book(self, practitioner_id: str) -> str:
        start = start_of(len(self.made))
        await self.world.appointment(
            practitioner_id, self.patient_id, start=WEEK_START + timedelta(days=2, minutes=len(self.made))
        )
        self.made.append((practitioner_id, start))
        return start

    def expected(self, watched: set[str]) -> list[str]:
        return [start for practitioner, start in self.made if practitioner in watched]


async def follow(changes: AsyncAppointmentWatch, seen: list[str]) -> None:
    async for change in changes:
        seen.append(change.appointment.start_time.ToJsonString())


def resumptions(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The client's log lines of live streams it resumed (one per stream ended under it)."""
    return [r.getMessage() for r in caplog.records if r.name == "apptgate_client" and "resuming in" in r.getMessage()]


async def test_a_watch_that_received_nothing_resumes_across_a_gateway_process_restart(
    fleet: list[Served], world: harness.World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="apptgate_client")
    gateway = fleet[0]
    await gateway.start()
    practitioner = await world.practitioner("Dr. Restart")
    writer = Writer(world, (await world.patient()).patient_id)
    partner = await world.partner("Restart Sync", practitioner)
    seen: list[str] = []
    async with (
        AsyncPartnerClient(f"127.0.0.1:{gateway.partner_port}", partner.secret, retry=QUICK) as client,
        client.watch_appointments() as changes,
    ):
        following = asyncio.create_task(follow(changes, seen))
        try:
            # The server's first bookmark: a token, though nothing was yielded.
            assert await harness.eventually(lambda: changes.resume_token != "")
            await gateway.stop()
            during = [await writer.book(practitioner), await writer.book(practitioner)]  # no gateway runs
            await gateway.start()
            after = await writer.book(practitioner)
            assert await harness.eventually(lambda: len(seen) >= 3)
        finally:
            following.cancel()
    assert seen == [*during, after]
    [resumed] = resumptions(caplog)
    assert "UNAVAILABLE" in resumed and "SERVER_SHUTTING_DOWN" in resumed


async def test_fifty_watches_receive_every_change_once_in_order_while_two_gateways_restart_in_turn(
    fleet: list[Served], world: harness.World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="apptgate_client")
    await asyncio.gather(*(gateway.start() for gateway in fleet))
    first, second = fleet
    busy = [await world.practitioner(f"Dr. Rolling {n}") for n in range(4)]
    # Quiet until their process restarts: a change is made only while it is down.
    quiet_first, quiet_second = await world.practitioner("Dr. Quiet A"), await world.practitioner("Dr. Quiet B")
    everyone = {*busy, quiet_first, quiet_second}
    partners = [await world.partner(f"Rolling Sync {n}", *everyone) for n in range(5)]
    writer = Writer(world, (await world.patient()).patient_id)
    # Each client is given both processes; pick_first takes the first it reaches, and the
    # other when that one stops: half start on each.
    targets = [
        f"ipv4:127.0.0.1:{first.partner_port},127.0.0.1:{second.partner_port}",
        f"ipv4:127.0.0.1:{second.partner_port},127.0.0.1:{first.partner_port}",
    ]
    streams: list[tuple[set[str], list[str]]] = []
    async with contextlib.AsyncExitStack() as stack:
        tasks = []
        # Streams 0 and 1 are the quiet ones, one on each process; a third of the others watch everything.
        plan = [quiet_first, quiet_second, *("" if n % 3 == 0 else busy[n % 4] for n in range(2, 50))]
        for n, practitioner in enumerate(plan):
            client = await stack.enter_async_context(
                AsyncPartnerClient(targets[n % 2], partners[n % 5].secret, retry=QUICK)
            )
            changes = await stack.enter_async_context(client.watch_appointments(practitioner_id=practitioner))
            seen: list[str] = []
            streams.append(({practitioner} if practitioner else everyone, seen))
            tasks.append(asyncio.create_task(follow(changes, seen)))
        stack.callback(lambda: [task.cancel() for task in tasks])

        stop_writing = asyncio.Event()

        async def write() -> None:
            n = 0
            while not stop_writing.is_set():
                await writer.book(busy[n % 4])
                n += 1
                await asyncio.sleep(0.03)  # a pace, not a wait for anything

        async def flowing() -> None:
            """Wait until every stream of a busy practitioner has received a change made from now on."""
            mark = writer.made[: len(writer.made)]
            waiting = [(sum(p in watched for p, _ in mark), seen) for watched, seen in streams if watched & set(busy)]
            assert await harness.eventually(lambda: all(len(seen) > before for before, seen in waiting))

        writing = asyncio.create_task(write())
        try:
            await flowing()
            await first.stop()
            await writer.book(quiet_first)  # the quiet stream of the first process had received nothing
            await first.start()
            await flowing()
            await second.stop()
            await writer.book(quiet_second)
            await second.start()
            await flowing()
            # Enough changes in all, however fast the restarts went.
            assert await harness.eventually(lambda: len(writer.made) > 50)
        finally:
            stop_writing.set()
            await writing
        for practitioner in sorted(everyone):  # the last changes: nothing after them can be missed
            await writer.book(practitioner)

        expected = [writer.expected(watched) for watched, _ in streams]
        assert await harness.eventually(
            lambda: all(len(seen) >= len(want) for (_, seen), want in zip(streams, expected, strict=True))
        ), [(len(seen), len(want)) for (_, seen), want in zip(streams, expected, strict=True)]

    for (_, seen), want in zip(streams, expected, strict=True):
        assert seen == want
    assert len(writer.made) > 50
    assert [len(seen) for _, seen in streams[:2]] == [2, 2]
    # Every stream was ended under its client at least once: 25 by the first restart, then all 50.
    resumed = resumptions(caplog)
    assert len(resumed) >= 75
    assert all("SERVER_SHUTTING_DOWN" in line for line in resumed)
