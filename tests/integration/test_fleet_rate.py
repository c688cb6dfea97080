"""The partner request rate held across processes: two ``serve`` processes share one partner's tokens."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import grpc
import grpc.aio
import harness
from appointments.partner.v1 import partner_appointment_service_pb2_grpc as partner_grpc
from harness import MONDAY, PartnerHandle, World

RATE = 5
BURST = 5
#: How long the partner hammers: the first second, then long enough for the rate to show.
HAMMERED = 4.0
CALLERS_PER_PROCESS = 4


@asynccontextmanager
async def _serving(env: dict[str, str]) -> AsyncIterator[tuple[grpc.aio.Channel, grpc.aio.Channel]]:
    """A ``serve`` process; its partner and internal channels."""
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "service", "serve", env=env)
    try:
        partner = env["APPTGATE_PARTNER_ADDR"]
        internal = env["APPTGATE_INTERNAL_ADDR"]
        await harness.wait_for_port(int(partner.rsplit(":", 1)[1]), within=60)
        await harness.wait_for_port(int(internal.rsplit(":", 1)[1]), within=60)
        async with grpc.aio.insecure_channel(partner) as partners, grpc.aio.insecure_channel(internal) as internals:
            yield partners, internals
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), timeout=60)


def _env(database_dsn: str, data_dir: Path) -> dict[str, str]:
    return harness.environment(
        DATABASE_URL=database_dsn,
        APPTGATE_DATA_DIR=str(data_dir),
        APPTGATE_INTERNAL_TOKEN=harness.INTERNAL_TOKEN,
        APPTGATE_PARTNER_ADDR=f"127.0.0.1:{harness.free_port()}",
        APPTGATE_INTERNAL_ADDR=f"127.0.0.1:{harness.free_port()}",
        APPTGATE_WORKERS="1",
    )


async def _hammer(
    partner: PartnerHandle, until: float, admitted: list[float], refused: list[tuple[grpc.StatusCode, str]]
) -> None:
    """Call ListAppointments back to back until ``until`` (loop time); note when each call was let through."""
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        try:
            await partner.list()
        except grpc.aio.AioRpcError as error:
            refused.append((error.code(), harness.error_info(error).reason))
        else:
            admitted.append(loop.time())


async def test_two_processes_hold_a_partners_rate_together(database_dsn: str, tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        # One after the other: the first creates the development secrets the second then reads.
        first = await stack.enter_async_context(_serving(_env(database_dsn, tmp_path / "data")))
        second = await stack.enter_async_context(_serving(_env(database_dsn, tmp_path / "data")))
        world = World(partner_channel=first[0], internal_channel=first[1])
        practitioner = await world.practitioner()
        await world.appointment(practitioner, (await world.patient()).patient_id, MONDAY)
        on_first = await world.partner("Hammering", practitioner)
        on_second = PartnerHandle(
            on_first.partner_id, on_first.key_id, on_first.secret, partner_grpc.PartnerAppointmentServiceStub(second[0])
        )
        await world.registry.SetPartnerLimits(
            harness.registry_pb.SetPartnerLimitsRequest(
                partner_id=on_first.partner_id, requests_per_second=RATE, burst=BURST
            ),
            metadata=world.internal_metadata,
        )
        # Each process reads the new limits within a second of their change; wait until both answer by them.
        for partner in (on_first, on_second):
            assert await harness.eventually(lambda p=partner: _refused_once(p), within=30)
        settled = asyncio.get_running_loop().time() + 1.2  # every token those calls took has left the window

        await asyncio.sleep(max(0.0, settled - asyncio.get_running_loop().time()))
        start = asyncio.get_running_loop().time()
        admitted: dict[str, list[float]] = {"first": [], "second": []}
        refused: list[tuple[grpc.StatusCode, str]] = []
        await asyncio.gather(
            *(
                _hammer(partner, start + HAMMERED, admitted[name], refused)
                for name, partner in (("first", on_first), ("second", on_second))
                for _ in range(CALLERS_PER_PROCESS)
            )
        )

    times = sorted(admitted["first"] + admitted["second"])
    in_first_second = sum(1 for t in times if t < start + 1)
    after = sum(1 for t in times if start + 1 <= t < start + HAMMERED)
    assert in_first_second <= BURST * 1.1, times
    assert after <= RATE * (HAMMERED - 1) * 1.1, times
    # The rate is held, not stopped: the partner keeps getting its calls through, on both processes.
    assert after >= RATE * (HAMMERED - 1) * 0.5, times
    assert admitted["first"] and admitted["second"]
    assert refused and set(refused) == {(grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")}


async def _refused_once(partner: PartnerHandle) -> bool:
    """Whether a burst of calls on ``partner``'s process now meets the new rate limit."""
    for _ in range(BURST + 2):
        try:
            await partner.list()
        except grpc.aio.AioRpcError as error:
            return error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    return False


async def test_a_partner_calling_steadily_below_its_rate_is_never_refused(world: World) -> None:
    practitioner = await world.practitioner()
    await world.appointment(practitioner, (await world.patient()).patient_id, MONDAY)
    partner = await world.partner("Steady", practitioner)
    # A tenth of a second's rate is 10 tokens: leased whole each tenth and left unspent, they would
    # fill the window of 100 within 11 tenths.
    await world.registry.SetPartnerLimits(
        harness.registry_pb.SetPartnerLimitsRequest(partner_id=partner.partner_id, requests_per_second=100, burst=100),
        metadata=world.internal_metadata,
    )

    for _ in range(25):  # one call a tenth of a second or slower: a quarter of the rate at most
        await partner.list()
        await asyncio.sleep(0.1)
