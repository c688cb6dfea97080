"""Fixtures for the client tests: addresses of the running gateway and a small agenda world."""

from __future__ import annotations

import subprocess
from pathlib import Path

import harness
import pytest
from client_world import NODE_DIR, NODE_STAMP, Agenda, build_agenda, required_tool

from service.app import Gateway


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """clients/typescript/node_modules, installed with ``npm ci`` from the committed lock file when needed."""
    npm = required_tool("npm")
    inputs = [NODE_DIR / "package.json", NODE_DIR / "package-lock.json"]
    if not NODE_STAMP.exists() or any(NODE_STAMP.stat().st_mtime < p.stat().st_mtime for p in inputs):
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_DIR, check=True)
        NODE_STAMP.touch()
    return NODE_DIR / "node_modules"


@pytest.fixture(scope="session")
def buf(node_modules: Path) -> str:
    """The buf binary of the npm package @bufbuild/buf (pinned in clients/typescript/package.json)."""
    path = node_modules / ".bin" / "buf"
    assert path.exists(), "npm ci did not install @bufbuild/buf"
    return str(path)


@pytest.fixture
def partner_target(gateway: Gateway) -> str:
    """``host:port`` of the gateway's partner listener."""
    assert gateway.partner
    return f"127.0.0.1:{gateway.partner.port}"


@pytest.fixture
def internal_target(gateway: Gateway) -> str:
    """``host:port`` of the gateway's internal listener."""
    assert gateway.internal
    return f"127.0.0.1:{gateway.internal.port}"


@pytest.fixture
async def agenda(world: harness.World) -> Agenda:
    """The agenda world of :func:`client_world.build_agenda`."""
    return await build_agenda(world)
