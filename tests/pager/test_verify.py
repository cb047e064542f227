"""verify="crc32": the first read of a tensor records its crc32 and every reload is
checked against it; a mismatch is a SourceError (counted in
``stats().checksum_failures``), leaves nothing resident and is not cached. Off by
default, and then a changed file is served as it now is."""

from __future__ import annotations

from pathlib import Path

import pytest

import asyncpager as ap
from asyncpager.testing import FaultySource
from tests.support.fakes import assert_invariants, make_tensors
from tests.support.pagers import PagerFactory

PAGE = 4096
BIG = 512 << 10  # checksummed off the event loop


def model(tmp_path: Path, sizes: list[int]) -> tuple[Path, bytes, list[ap.TensorInfo]]:
    blob, infos = make_tensors(sizes, gap=128 << 10)  # one read per tensor
    path = tmp_path / "m.bin"
    path.write_bytes(blob)
    return path, blob, infos


def one_tensor_budget(blob: bytes, infos: list[ap.TensorInfo]) -> int:
    """A budget that holds t0 or t1 but not both (they have the same charge)."""
    charge = ap.Pager(ap.MemorySource(blob), infos, budget_bytes=len(blob)).charge_of("t0")
    return charge + charge // 2


def overwrite(path: Path, offset: int, data: bytes) -> None:
    """Change bytes in place (same inode: the pager's descriptor sees them)."""
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


async def evict(pager: ap.Pager, name: str) -> None:
    """Load ``name`` (budget: one tensor), so whatever was resident is evicted."""
    (await pager.acquire(name)).release()


@pytest.mark.parametrize("size", [100, PAGE + 100, BIG])
async def test_a_changed_tensor_fails_its_reload(
    size: int, tmp_path: Path, make_pager: PagerFactory
) -> None:
    path, blob, infos = model(tmp_path, [size, size])
    t0 = infos[0]
    budget = one_tensor_budget(blob, infos)
    pager = make_pager(
        ap.FileSource(path), infos, budget_bytes=budget, verify="crc32", owns_source=True
    )
    (await pager.acquire("t0")).release()  # first read: the checksum is recorded
    await evict(pager, "t1")
    assert not pager.is_resident("t0")
    overwrite(path, t0.offset + size // 2, b"\x00\xff\x00")
    with pytest.raises(ap.SourceError, match="crc32") as err:
        await pager.acquire("t0")
    assert "t0" in str(err.value)
    assert pager.stats().checksum_failures == 1
    assert not pager.is_resident("t0")
    assert not pager.is_loading("t0")
    assert_invariants(pager)
    with pytest.raises(ap.SourceError):  # not cached: read and checked again
        await pager.acquire("t0")
    assert pager.stats().checksum_failures == 2
    async with pager.acquire("t1") as t1:  # the rest of the model is fine
        assert t1.array.tobytes() == blob[infos[1].offset : infos[1].end]
    path.write_bytes(blob)  # the original bytes are back: so is the tensor
    async with pager.acquire("t0") as lease:
        assert lease.array.tobytes() == blob[t0.offset : t0.end]
    assert pager.stats().checksum_failures == 2


async def test_unchanged_tensors_reload_cleanly(tmp_path: Path, make_pager: PagerFactory) -> None:
    path, blob, infos = model(tmp_path, [PAGE, 100, 3 * PAGE])
    src = FaultySource(ap.FileSource(path))
    budget = 3 * PAGE + 64
    pager = make_pager(src, infos, budget_bytes=budget, verify="crc32", owns_source=True)
    for _ in range(20):
        for info in infos:
            async with pager.acquire(info.name) as lease:
                assert lease.array.tobytes() == blob[info.offset : info.end]
    st = pager.stats()
    assert st.loads > 40  # most acquires were reloads after an eviction
    assert st.checksum_failures == 0
    assert st.load_errors == 0


async def test_a_failed_first_read_records_no_checksum(
    tmp_path: Path, make_pager: PagerFactory
) -> None:
    """A short first read must not become the reference the next reads are held to."""
    path, blob, infos = model(tmp_path, [PAGE])
    src = FaultySource(ap.FileSource(path), script=["short"])
    pager = make_pager(src, infos, budget_bytes=PAGE, verify="crc32", owns_source=True)
    with pytest.raises(ap.SourceError, match="short read"):
        await pager.acquire("t0")
    async with pager.acquire("t0") as lease:
        assert lease.array.tobytes() == blob[:PAGE]
    assert pager.stats().checksum_failures == 0


async def test_off_by_default(tmp_path: Path, make_pager: PagerFactory) -> None:
    path, _, infos = model(tmp_path, [PAGE, PAGE])
    pager = make_pager(ap.FileSource(path), infos, budget_bytes=PAGE, owns_source=True)
    (await pager.acquire("t0")).release()
    await evict(pager, "t1")
    overwrite(path, infos[0].offset, b"changed")
    async with pager.acquire("t0") as lease:  # no check: the new bytes, no error
        assert lease.array.tobytes()[:7] == b"changed"
    assert pager.stats().checksum_failures == 0


def test_verify_takes_only_crc32() -> None:
    blob, infos = make_tensors([64])
    with pytest.raises(ValueError, match="verify"):
        ap.Pager(ap.MemorySource(blob), infos, budget_bytes=64, verify="md5")
