"""A body that is the whole object is checked against the MD5 its ETag states
(S3's ETag of a single-part upload): damage in transit is fetched again, never
returned; an ETag that only looks like an MD5 (an encrypted object's) is told from
damage by a second GET and accepted unchecked; ranged bodies are not checked."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import asyncpager as ap
from asyncpager.sources._remote import ObjectStoreSource
from tests.support.remote_servers import MotoS3, RangeServer

FAST = {"retries": 0, "backoff": 0.001, "timeout": 5.0}
DATA = bytes(range(256)) * 40


def _serve(server: RangeServer) -> str:
    (server.root / "small.bin").write_bytes(DATA)
    return f"{server.url}/small.bin"


async def test_whole_object_damaged_in_transit_is_fetched_again(
    range_server: RangeServer,
) -> None:
    url = _serve(range_server)
    range_server.faults.md5_etag = True
    with ObjectStoreSource(url, **FAST) as src:  # type: ignore[arg-type]
        assert src._pin.md5 is not None
        range_server.faults.corrupt_next = 1
        out = bytearray(len(DATA))
        await src.read_into(0, memoryview(out))  # no retries: the check's own GET
        assert bytes(out) == DATA
        assert src.stats.requests == 2
        assert src.stats.etag_verified == 1
        range_server.faults.corrupt_next = 2  # damaged differently on both GETs
        with pytest.raises(ap.SourceError, match="does not match the object's ETag") as caught:
            await src.read_into(0, memoryview(out))
        assert "failed after 2 attempts" in str(caught.value)
    with ObjectStoreSource(url, retries=2, backoff=0.001) as src:
        range_server.faults.corrupt_next = 1  # with retries: a retry like any other
        await src.read_into(0, memoryview(out))
        assert bytes(out) == DATA
        assert (src.stats.requests, src.stats.retries) == (2, 1)


async def test_an_etag_that_is_no_md5_is_accepted_after_a_second_get(
    range_server: RangeServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = _serve(range_server)
    range_server.faults.etag = '"0123456789abcdef0123456789abcdef"'  # like SSE-KMS's
    caplog.set_level(logging.INFO, logger="asyncpager")
    with ObjectStoreSource(url, **FAST) as src:  # type: ignore[arg-type]
        out = bytearray(len(DATA))
        await src.read_into(0, memoryview(out))
        assert bytes(out) == DATA
        assert (src.stats.requests, src.stats.etag_verified) == (2, 0)
    assert any("not the MD5" in r.getMessage() for r in caplog.records)


async def test_ranged_bodies_are_not_checked(range_server: RangeServer) -> None:
    url = _serve(range_server)
    range_server.faults.md5_etag = True
    with ObjectStoreSource(url, **FAST) as src:  # type: ignore[arg-type]
        out = bytearray(100)
        await src.read_into(10, memoryview(out))
        assert (src.stats.requests, src.stats.etag_verified) == (1, 0)


def test_header_reads_of_a_whole_small_object_are_checked(range_server: RangeServer) -> None:
    url = _serve(range_server)
    range_server.faults.md5_etag = True
    range_server.faults.corrupt_next = 1
    from asyncpager.sources._object import remote_location

    reader = remote_location(url).open_reader()
    assert reader.read(0, len(DATA)) == DATA
    assert len(range_server.gets()) == 2


async def test_s3_single_part_upload_etag_is_its_md5(moto_s3: MotoS3, tmp_path: Path) -> None:
    path = tmp_path / "small.bin"
    path.write_bytes(DATA)
    url = moto_s3.upload(path, f"{tmp_path.name}/small.bin")
    src = ObjectStoreSource(url, storage_options=moto_s3.storage_options, **FAST)  # type: ignore[arg-type]
    with src:
        out = bytearray(len(DATA))
        await src.read_into(0, memoryview(out))
        assert bytes(out) == DATA
        assert (src.stats.requests, src.stats.etag_verified) == (1, 1)
