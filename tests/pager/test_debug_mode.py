"""Debug mode catches arrays used after their lease's release
(on for the whole suite through conftest; ASYNCPAGER_DEBUG=1 for users)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import asyncpager as ap
from tests.support.fakes import make_tensors
from tests.support.pagers import PagerFactory

PAGE = 4096


async def test_release_warns_when_the_array_is_still_referenced(
    make_pager: PagerFactory,
) -> None:
    blob, infos = make_tensors([PAGE, PAGE])
    p = make_pager(ap.MemorySource(blob), infos, budget_bytes=PAGE, debug=True)
    lease = await p.acquire("t0")
    kept = lease.array
    with pytest.warns(ap.LeaseWarning, match="'t0' released while its array is still referenced"):
        lease.release()
    # The buffer is evicted and poisoned: the kept array reads garbage, not t0.
    async with p.acquire("t1") as other:
        assert other.array.tobytes() == blob[PAGE:]
    assert not p.is_resident("t0")
    assert kept.tobytes() != blob[:PAGE]
    del kept


async def test_no_warning_when_nothing_is_kept(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([PAGE])
    p = make_pager(ap.MemorySource(blob), infos, budget_bytes=PAGE, debug=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        async with p.acquire("t0") as lease:
            assert int(np.asarray(lease.array).sum()) == sum(blob[:PAGE])
        lease2 = await p.acquire("t0")
        lease2.release()


async def test_each_lease_has_its_own_array_object_in_debug_mode(
    make_pager: PagerFactory,
) -> None:
    blob, infos = make_tensors([PAGE])
    p = make_pager(ap.MemorySource(blob), infos, budget_bytes=PAGE, debug=True)
    a, b = await p.acquire("t0"), await p.acquire("t0")
    assert a.array is not b.array
    assert np.shares_memory(a.array, b.array)
    a.release()  # b's array does not count as a reference to a's
    b.release()


def test_env_var_turns_debug_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # the suite's default off, to read the environment
    blob, infos = make_tensors([PAGE])
    monkeypatch.setenv("ASYNCPAGER_DEBUG", "1")
    assert ap.Pager(ap.MemorySource(blob), infos, budget_bytes=PAGE)._shell._debug
    monkeypatch.setenv("ASYNCPAGER_DEBUG", "0")
    assert not ap.Pager(ap.MemorySource(blob), infos, budget_bytes=PAGE)._shell._debug
    assert ap.Pager(ap.MemorySource(blob), infos, budget_bytes=PAGE, debug=True)._shell._debug
