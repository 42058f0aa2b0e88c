"""The suite's fixtures: real parts (a mosquitto on a free loopback port, ptys as serial
ports, the registry in-process, PostgreSQL, headless Chromium). The helpers behind them
are agent.testing (generic harness) and tests/support (test-only emulators and data)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.errors import HarnessError
from agent.testing import Broker, Pty, RegistryProbe, mosquitto_binary, running_registry
from tests.support.browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS
from tests.support.central import ContractSpy, PgCluster
from tests.support.rabbit import RabbitCluster, rabbit_missing


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A real mosquitto; missing is a failure (make setup installs it), not a skip."""
    try:
        mosquitto_binary()
    except HarnessError as e:
        pytest.fail(str(e))
    b = Broker(tmp_path)
    b.start()
    yield b
    b.kill()


@pytest.fixture
def pty_port(tmp_path: Path) -> Iterator[Pty]:
    p = Pty(tmp_path / "ttyScanner")
    yield p
    p.close()


@pytest.fixture
async def registry(broker: Broker, tmp_path: Path) -> AsyncIterator[RegistryProbe]:
    async with running_registry(broker.port, tmp_path / "registry.db") as probe:
        yield probe


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    cluster = PgCluster()
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def rabbit_cluster() -> Iterator[RabbitCluster]:
    """A real 3-node RabbitMQ cluster on loopback (tests/support/rabbit.py), one per session;
    skipped, saying why, only where rabbitmq-server is not installed."""
    why = rabbit_missing()
    if why is not None:
        pytest.skip(why)
    cluster = RabbitCluster()
    try:
        cluster.start_all()
        yield cluster
    finally:
        cluster.stop_all()


@pytest.fixture
def pg_dsn(pg_cluster: PgCluster) -> str:
    return pg_cluster.new_database()


@pytest.fixture
async def contract_spy(broker: Broker) -> AsyncIterator[ContractSpy]:
    """Use in any broker test: every message an agent or registry sends must fit the contract."""
    spy = ContractSpy(broker.port)
    task = asyncio.create_task(spy.run(), name="contract-spy")
    await asyncio.wait_for(spy.subscribed.wait(), 10)
    yield spy
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert spy.problems == [], "messages outside docs/asyncapi.yaml:\n" + "\n".join(spy.problems)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """A real headless Chromium; missing is a failure (make setup installs it), not a skip."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run `make setup` (Debian package chromium)")
    from playwright.async_api import async_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        await b.close()


@pytest.fixture
async def page(browser: Any) -> AsyncIterator[Any]:
    """A page of its own in `browser` (1400 x 800); the test fails if the page's script
    ever throws."""
    context = await browser.new_context(viewport={"width": 1400, "height": 800})
    pg = await context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    await context.close()
    assert errors == []  # the page's script never threw


#: of each log a failing test leaves in its tmp_path, the end shown in the failure report
LOG_TAIL_CHARS = 3000


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failure in CI is often all there is of a run: the end of every *.log the test's
    processes wrote (agent, registry, broker) goes into its report."""
    outcome = yield
    report = outcome.get_result()
    tmp = getattr(item, "funcargs", {}).get("tmp_path")
    if report.when != "call" or not report.failed or not isinstance(tmp, Path):
        return
    for log in sorted(tmp.rglob("*.log"))[:6]:
        with contextlib.suppress(OSError):
            text = log.read_text(errors="replace")[-LOG_TAIL_CHARS:]
            report.sections.append((f"end of {log.relative_to(tmp)}", text))
