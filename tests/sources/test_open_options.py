"""Opening a model as a new user would: sizes as strings, clear refusals of
impossible or contradictory options, SourceError for a missing file, an awaitable
open that keeps the index parse off the loop, and a TimeoutError that names what
timed out."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

import asyncpager as ap
from tests.support.fakes import GatedSource, make_tensors
from tests.support.formatgen import write_gguf_model
from tests.support.pagers import PagerFactory

PAGE = 4096


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "m.gguf"
    write_gguf_model(path, n_layers=2)
    return path


async def test_open_a_missing_file_raises_source_error(tmp_path: Path) -> None:
    with pytest.raises(ap.SourceError, match="cannot open") as info:
        ap.open(tmp_path / "nope.gguf", budget_bytes="1MiB")
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert isinstance(info.value, OSError)  # nobody catching OSError breaks
    with pytest.raises(ap.SourceError):
        await ap.open_async(tmp_path / "nope.gguf", budget_bytes="1MiB")


async def test_budget_accepts_size_strings_and_shares(model: Path) -> None:
    async with ap.open(model, budget_bytes="512KiB") as pager:
        assert pager.budget_bytes == 512 << 10
    index = ap.read_index(model)
    layer_bytes = sum(index.tensors[n].nbytes for ns in index.layers.values() for n in ns)
    async with ap.open(model, budget_bytes="50%") as pager:
        assert pager.budget_bytes == layer_bytes // 2
    blob, infos = make_tensors([PAGE, PAGE])
    pager = ap.Pager(ap.MemorySource(blob), infos, budget_bytes="100%")
    assert pager.budget_bytes == 2 * PAGE
    await pager.close()


@pytest.mark.parametrize(
    ("budget", "error", "match"),
    [
        (0, ValueError, "must be > 0"),
        (-1, ValueError, "must be > 0"),
        ("0", ValueError, "must be > 0"),
        ("lots", ValueError, "budget_bytes: invalid size"),
        (1.5, TypeError, "size string"),
    ],
)
def test_impossible_budgets_are_refused(budget: object, error: type, match: str) -> None:
    blob, infos = make_tensors([PAGE])
    with pytest.raises(error, match=match):
        ap.Pager(ap.MemorySource(blob), infos, budget_bytes=budget)  # type: ignore[arg-type]


def test_contradictory_options_are_refused(model: Path) -> None:
    with pytest.raises(ValueError, match="direct_io=True needs source='file'"):
        ap.open(model, budget_bytes="1MiB", source="mmap", direct_io=True)
    with pytest.raises(ValueError, match="unknown source kind"):
        ap.open(model, budget_bytes="1MiB", source="tape")  # type: ignore[arg-type]


async def test_open_async_parses_off_the_loop(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncpager._open as opener

    threads: list[int] = []
    real = opener.read_index

    def spy(path: object) -> ap.ModelIndex:
        threads.append(threading.get_ident())
        return real(path)  # type: ignore[arg-type]

    monkeypatch.setattr(opener, "read_index", spy)
    pager = await ap.open_async(model, budget_bytes="1MiB", prefetch_depth=1)
    async with pager:
        assert threads
        assert threads[0] != threading.get_ident()
        async with pager.acquire_layer(0) as layer:
            assert layer
    assert pager.closed


async def test_timeout_error_names_the_tensor_and_the_timeout(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([PAGE, PAGE, PAGE])
    src = GatedSource(blob)
    pager = make_pager(src, infos, budget_bytes=2 * PAGE)
    with pytest.raises(TimeoutError, match=r"'t0' timed out after 0.01 s waiting for the read"):
        await pager.acquire("t0", timeout=0.01)
    src.open_all()
    held = await pager.acquire_many(["t0", "t1"])
    with pytest.raises(TimeoutError, match=r"'t2' timed out after 0.01 s waiting for room"):
        await pager.acquire("t2", timeout=0.01)
    with pytest.raises(TimeoutError, match=r"2 tensors timed out after 0.01 s"):
        await pager.acquire_many(["t2", "t0"], timeout=0.01)
    held.release()
    await asyncio.sleep(0)
