"""Programs started as another account (:mod:`service.store.accounts`) from a process whose gRPC is busy."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import subprocess
from collections import Counter

import grpc
import grpc.aio
import harness
import pytest

from service.store.accounts import as_account
from service.store.embedded import SERVER_USER

#: Runs started: enough that :mod:`subprocess`'s own ``user`` (a ``fork()``) has some of them crash under these calls.
RUNS = 40


def test_a_program_needs_an_absolute_path() -> None:
    with pytest.raises(ValueError, match="needs an absolute path"):
        as_account(pwd.getpwuid(os.getuid()), ["id", "-u"])


@pytest.mark.skipif(os.geteuid() != 0, reason="changing accounts needs root")
async def test_programs_run_as_the_account_in_its_group_alone_while_grpc_serves_calls() -> None:
    import pgserver.utils

    pgserver.utils.ensure_user_exists(SERVER_USER)
    account = pwd.getpwnam(SERVER_USER)
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    refused: Counter[grpc.StatusCode] = Counter()

    async def call_forever() -> None:
        # Calls to a method the server does not have: gRPC's threads busy with real traffic all along.
        while True:
            try:
                await channel.unary_unary("/apptgate.test.Nothing/Here")(b"", timeout=5)
            except grpc.aio.AioRpcError as error:
                refused[error.code()] += 1

    callers = [asyncio.create_task(call_forever()) for _ in range(4)]
    loop = asyncio.get_running_loop()
    command = as_account(account, [shutil.which("id") or "/usr/bin/id"])
    try:
        assert await harness.eventually(lambda: refused.total() >= len(callers))
        runs = [await loop.run_in_executor(None, lambda: subprocess.run(command, capture_output=True, text=True))
                for _ in range(RUNS)]  # fmt: skip
    finally:
        for caller in callers:
            caller.cancel()
        await asyncio.gather(*callers, return_exceptions=True)
        await channel.close()
        await server.stop(None)

    assert [run.returncode for run in runs] == [0] * RUNS, [run.stderr for run in runs if run.returncode]
    name, uid, gid = account.pw_name, account.pw_uid, account.pw_gid
    expected = f"uid={uid}({name}) gid={gid}({name}) groups={gid}({name})"  # none of root's groups
    assert {run.stdout.strip() for run in runs} == {expected}
    assert set(refused) == {grpc.StatusCode.UNIMPLEMENTED}
