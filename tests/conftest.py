"""Fixtures every folder shares: every async test runs on asyncio and on uvloop, and every pager a
test builds through ``make_pager`` is checked for exact accounting — continuously by a
monitor task while the test runs, and once more at the end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import pytest
import uvloop

import asyncpager as ap
import asyncpager.pager._pager
from tests.support.fakes import assert_invariants
from tests.support.pagers import PagerFactory, PagerWatch

if TYPE_CHECKING:  # the servers import aiohttp and moto: only the tests that use them load them
    from tests.support.emulators import Store
    from tests.support.remote_servers import MotoS3, RangeServer


def pytest_asyncio_loop_factories(
    config: Any, item: Any
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(autouse=True)
def _debug_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Debug mode on for every pager a test builds in this process (subprocesses such
    as the example server run as users would): a test that keeps an array past its
    lease's release gets a LeaseWarning (an error under -W error), and evicted
    buffers are poisoned, so a use after release cannot pass on stale bytes."""
    monkeypatch.setattr(asyncpager.pager._pager, "debug_default", lambda: True)


@pytest.fixture
async def watch_pager() -> AsyncIterator[PagerWatch]:
    """``watch_pager(pager)``: sample the pager's invariants with a monitor task while
    the test runs and check them (then close the pager) at teardown; for pagers built
    elsewhere (``ap.open``, ``PagedCausalLM``)."""
    pagers: list[ap.Pager] = []
    violations: list[str] = []

    async def monitor() -> None:
        while True:
            for p in pagers:
                if p.resident_bytes + p.inflight_bytes + p.row_bytes > p.budget_bytes:
                    violations.append(repr(p))
            await asyncio.sleep(0.0005)

    task = asyncio.get_running_loop().create_task(monitor(), name="test:invariant-monitor")

    def watch(pager: ap.Pager) -> ap.Pager:
        pagers.append(pager)
        return pager

    try:
        yield watch
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for p in pagers:
            if not p.closed:
                await asyncio.sleep(0)  # let finished loads settle
                assert_invariants(p)
            await p.close()
            assert_invariants(p, closed=True)
        assert not violations, f"budget exceeded while the test ran: {violations[:3]}"


@pytest.fixture
def make_pager(watch_pager: PagerWatch) -> PagerFactory:
    """Build pagers whose invariants are sampled by a monitor task during the test
    and checked (then the pager closed) at teardown."""

    def factory(*args: Any, **kwargs: Any) -> ap.Pager:
        return watch_pager(ap.Pager(*args, **kwargs))

    return factory


# -- real servers on loopback (object-storage tests) ---------------------------


@pytest.fixture
def range_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RangeServer]:
    """An HTTP server honouring Range/If-Match over a fresh directory, with fault hooks."""
    from tests.support.remote_servers import RangeServer

    server = RangeServer(tmp_path_factory.mktemp("served")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def _moto() -> Iterator[tuple[MotoS3, Store]]:
    from tests.support.emulators import moto_store

    with moto_store() as both:
        yield both


@pytest.fixture(scope="session")
def moto_s3(_moto: tuple[MotoS3, Store]) -> MotoS3:
    """moto's standalone S3 server on a free loopback port, one bucket; session-wide."""
    return _moto[0]


@pytest.fixture(scope="session")
def _azurite() -> Iterator[Store]:
    from tests.support.emulators import azurite_store

    with azurite_store() as store:
        yield store


@pytest.fixture(scope="session")
def _fake_gcs() -> Iterator[Store]:
    from tests.support.emulators import fake_gcs_store

    with fake_gcs_store() as store:
        yield store


STORES = ["s3", "gcs", "azure"]


def session_store(request: pytest.FixtureRequest, kind: str) -> Store:
    """The session's emulator of ``kind`` (started on first use), its proxy's faults
    cleared; the caller clears them again after the test."""
    found = request.getfixturevalue({"s3": "_moto", "gcs": "_fake_gcs", "azure": "_azurite"}[kind])
    store: Store = found[1] if isinstance(found, tuple) else found
    store.proxy.reset()
    return store


@pytest.fixture(params=STORES)
def object_store(request: pytest.FixtureRequest) -> Iterator[Store]:
    """Each object store on loopback in turn, one process per store and session: moto's
    S3, fake-gcs-server, Azurite; with a fault proxy in front (``faulty_options``),
    its faults cleared after the test."""
    store = session_store(request, request.param)
    yield store
    store.proxy.reset()
