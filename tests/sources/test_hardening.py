"""The pager core: one regression test per defect found by attacking the pager
(numbers in the test names are the issue's defect numbers)."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncpager as ap
from asyncpager.sources._source import _run_all
from tests.support.fakes import GatedSource, assert_invariants, make_tensors
from tests.support.pagers import PagerFactory

PAGE = 4096


async def test_1_pin_skips_a_cancelled_waiter_and_wakes_the_rest(
    make_pager: PagerFactory,
) -> None:
    p = make_pager(
        ap.MemorySource(bytes(4096)),
        [
            ap.TensorInfo("a", 0, 1500),
            ap.TensorInfo("c", 1536, 1000),
            ap.TensorInfo("e", 2560, 400),
        ],
        budget_bytes=2000,
    )
    held = await p.acquire("a")
    w1 = asyncio.create_task(p.acquire("c"))
    w2 = asyncio.create_task(p.acquire("c", timeout=3))
    w3 = asyncio.create_task(p.acquire("e", timeout=3))
    await asyncio.sleep(0)
    assert p.waiting == 3
    w1.cancel()
    p.pin("a")  # no InvalidStateError: w1's future is done and skipped
    with pytest.raises(ap.BudgetExceeded):
        await w2  # "c" can never fit beside the pinned "a": told at once
    lease = await w3
    assert lease.array.nbytes == 400
    lease.release()
    with pytest.raises(asyncio.CancelledError):
        await w1
    held.release()
    assert p.waiting == 0
    assert_invariants(p)


async def test_2_a_load_whose_commit_fails_fails_its_waiters_and_gives_room_back(
    make_pager: PagerFactory,
) -> None:
    # Zero bytes, but a shape numpy cannot build: the reshape raises at commit.
    # TensorInfo refuses such a shape itself, so corrupt one after the
    # fact: the pager must survive whatever an index lets through.
    bad = ap.TensorInfo("bad", 64, 0, "float32", shape=(0,))
    object.__setattr__(bad, "shape", (0, 2**62))
    good = ap.TensorInfo("good", 0, 64)
    after = ap.TensorInfo("after", 64, 64)
    p = make_pager(ap.MemorySource(bytes(256)), [good, bad, after], budget_bytes=4096)
    with pytest.raises(ap.SourceError, match="bad") as info:
        await p.acquire_many(["good", "bad", "after"])
    assert isinstance(info.value.__cause__, ValueError)
    for name in ("good", "bad", "after"):
        assert not p.is_loading(name)
    assert p.inflight_bytes == 0
    # The others of that scatter read landed; the pager is usable.
    async with p.acquire("after") as lease:
        assert lease.array.nbytes == 64
    assert_invariants(p)


class _RaisingSource(ap.Source):
    def __init__(self, size: int, exc: BaseException) -> None:
        self.size = size
        self.exc = exc

    async def read_into(self, offset: int, out: memoryview) -> None:
        await asyncio.sleep(0)
        raise self.exc


class _Odd(BaseException):
    pass


@pytest.mark.parametrize(
    "exc",
    [asyncio.CancelledError(), _Odd("odd"), RuntimeError("bug"), OSError(5, "EIO"), MemoryError()],
    ids=["cancelled", "base-exception", "runtime", "oserror", "memory"],
)
async def test_7_any_source_exception_fails_the_load_with_source_error(
    make_pager: PagerFactory, exc: BaseException
) -> None:
    p = make_pager(_RaisingSource(2 * PAGE, exc), make_tensors([PAGE, PAGE])[1], budget_bytes=PAGE)
    waiters = [asyncio.create_task(p.acquire("t0")) for _ in range(3)]
    for w in waiters:
        with pytest.raises(ap.SourceError) as info:
            await w
        assert info.value.__cause__ is exc
    assert not p.is_loading("t0")
    assert p.inflight_bytes == 0
    assert not p.closed
    assert p.stats().load_errors == 1
    assert_invariants(p)


async def test_7_close_still_gives_pager_closed(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([PAGE])
    src = GatedSource(blob)
    p = make_pager(src, infos, budget_bytes=PAGE)
    w = asyncio.create_task(p.acquire("t0"))
    await src.read_started(0).wait()
    await p.close()
    with pytest.raises(ap.PagerClosed):
        await w


def _abandon_before_the_read(pager: ap.Pager, name: str) -> None:
    """The issue's trigger: a demand acquire joins the (prefetch) load of ``name`` and
    fails synchronously right after admission (a timeout that is not a number), so
    its load is aborted before its read task ever ran."""
    coro = pager.acquire(name, timeout="soon")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        coro.send(None)


async def test_4_an_abandoned_member_wider_than_the_scratch_buffer_shifts_nothing(
    make_pager: PagerFactory,
) -> None:
    # t0, t1 (200 KiB), t2 adjacent: one scatter read; t1 abandoned leaves a 200 KiB hole.
    blob, infos = make_tensors([PAGE, 200 << 10, PAGE])
    p = make_pager(ap.MemorySource(blob), infos, budget_bytes=1 << 20)
    p.prefetch(["t0", "t1", "t2"])
    _abandon_before_the_read(p, "t1")
    assert not p.is_loading("t1")
    async with p.acquire_many(["t0", "t2", "t1"]) as leases:
        for info in infos:
            assert leases[info.name].array.tobytes() == blob[info.offset : info.end], info.name
    assert_invariants(p)


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop])
@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    sizes=st.lists(st.sampled_from([1, 64, 3000, PAGE, 70_000, 200_000]), min_size=2, max_size=7),
    gap=st.sampled_from([0, 64, 40_000]),
    data=st.data(),
)
def test_4_property_every_lease_holds_the_files_bytes(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
    sizes: list[int],
    gap: int,
    data: st.DataObject,
) -> None:
    blob, infos = make_tensors(sizes, gap=gap)
    names = [i.name for i in infos]
    abandoned = data.draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))

    async def scenario() -> None:
        p = ap.Pager(ap.MemorySource(blob), infos, budget_bytes=len(blob) + 64 * PAGE)
        p.prefetch(names)
        for name in abandoned:
            _abandon_before_the_read(p, name)
        async with p.acquire_many(names) as leases:
            for info in infos:
                assert leases[info.name].array.tobytes() == blob[info.offset : info.end]
        assert_invariants(p)
        await p.close()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(scenario())


async def test_9_handed_out_views_cannot_be_made_writable(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([64, 2 * PAGE])
    p = make_pager(ap.MemorySource(blob), infos, budget_bytes=4 * PAGE)
    for name in ("t0", "t1"):
        async with p.acquire(name) as lease:
            with pytest.raises(ValueError, match="WRITEABLE"):
                lease.array.flags.writeable = True
            with pytest.raises(ValueError, match="read-only"):
                lease.array[0] = 1
            # Nor through a view of it.
            view = lease.array.view()
            with pytest.raises(ValueError, match="WRITEABLE"):
                view.flags.writeable = True
            del view


async def test_11_scalar_tensors_keep_shape_empty(make_pager: PagerFactory) -> None:
    data = np.array([1.5, 2.5], np.float32).tobytes()
    info = ap.TensorInfo("s", 4, 4, "float32", shape=())
    p = make_pager(ap.MemorySource(data), [info], budget_bytes=64)
    async with p.acquire("s") as lease:
        assert lease.array.shape == ()
        assert float(lease.array) == 2.5


def test_3_a_release_after_the_first_loop_closed_is_not_lost() -> None:
    """asyncio.run twice: a warm-up, then the real run. A lease handed to a worker
    thread is released after the first loop closed; the pager rebinds to the loop
    running now and the budget comes back."""
    blob, infos = make_tensors([PAGE, PAGE])
    p = ap.Pager(ap.MemorySource(blob), infos, budget_bytes=PAGE)

    async def warm_up() -> ap.Lease:
        return await p.acquire("t0")

    for factory in (asyncio.new_event_loop, uvloop.new_event_loop):
        with asyncio.Runner(loop_factory=factory) as runner:
            lease = runner.run(warm_up())
        # The first loop is closed; a thread releases now.
        worker = threading.Thread(target=lease.release)
        worker.start()
        worker.join()

        async def serve() -> None:
            async with p.acquire("t1", timeout=5) as other:  # needs t0's room
                assert other.array.tobytes() == blob[PAGE : 2 * PAGE]
            # And a release from a thread while this loop runs reaches this loop.
            held = await p.acquire("t0", timeout=5)
            await asyncio.to_thread(held.release)
            async with p.acquire("t1", timeout=5):
                pass

        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(serve())
        assert p.lease_count("t0") == 0
        assert_invariants(p)


class _ThreadGatedSource(ap.Source):
    """Reads run on a worker thread and block there until ``gate`` is set."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.size = len(data)
        self.executor = ThreadPoolExecutor(1, "test-gated")
        self.gate = threading.Event()
        self.started = threading.Event()
        self.closed = False

    def _blocking_read(self, offset: int, out: memoryview) -> None:
        self.started.set()
        self.gate.wait(10)
        out[:] = self._data[offset : offset + out.nbytes]

    async def read_into(self, offset: int, out: memoryview) -> None:
        await _run_all(self.executor, [functools.partial(self._blocking_read, offset, out)])

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.closed = True


async def test_8_close_awaits_thread_reads_without_blocking_the_loop() -> None:
    blob, infos = make_tensors([PAGE])
    src = _ThreadGatedSource(blob)
    p = ap.Pager(src, infos, budget_bytes=PAGE, owns_source=True)
    waiter = asyncio.create_task(p.acquire("t0"))
    await asyncio.to_thread(src.started.wait, 10)
    # Safety net for the old, blocking close: the gate opens by itself after a while.
    timer = threading.Timer(5, src.gate.set)
    timer.start()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(p.close(), 0.05)
    assert not src.gate.is_set(), "the loop was blocked until the thread read ended"
    assert p.closed
    assert not src.closed
    src.gate.set()
    timer.cancel()
    await p.close()  # the same close, still running: waits for it
    assert src.closed
    with pytest.raises(ap.PagerClosed):
        await waiter
    assert_invariants(p, closed=True)


async def test_11_prefetch_outside_a_loop_reserves_nothing() -> None:
    blob, infos = make_tensors([PAGE])
    p = ap.Pager(ap.MemorySource(blob), infos, budget_bytes=PAGE)

    def hint() -> None:
        p.prefetch(["t0"])

    with pytest.raises(RuntimeError, match="running event loop"):
        await asyncio.to_thread(hint)
    assert p.inflight_bytes == 0
    assert not p.is_loading("t0")
    await p.close()


async def test_11_tensors_leased_at_close_are_freed_when_released(
    make_pager: PagerFactory,
) -> None:
    blob, infos = make_tensors([PAGE, PAGE])
    p = make_pager(ap.MemorySource(blob), infos, budget_bytes=2 * PAGE, pinned=["t1"])
    lease = await p.acquire("t0")
    pinned = await p.acquire("t1")
    await p.close()
    assert p.resident_bytes == 2 * PAGE  # still leased: kept
    lease.release()
    pinned.release()
    assert p.resident_bytes == 0
    assert p.resident_count == 0
    assert p.pinned_reserve_bytes == PAGE
    assert_invariants(p, closed=True)
