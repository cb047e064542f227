"""Secrets in a URL (user info, query string) never reach a message, a repr or a log
line, on every error path of every source: an HTTP server honouring Range, moto's
S3, fake-gcs-server and Azurite (faults from a proxy in front of each). Each case
plants a user, a password, a token and a signature in the URL (the store's secret
key is in its storage options), drives one path, and scans every exception (the
whole chain, as a traceback prints it), every log record and every repr it
produced; each also checks that its path was really taken."""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import traceback
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

import asyncpager as ap
from asyncpager.sources._cache import DiskCache
from asyncpager.sources._object import remote_location
from asyncpager.sources._remote import ObjectStoreSource
from tests.conftest import STORES, session_store
from tests.support.cached_reads import flip_byte, read_all_cached
from tests.support.formatgen import write_safetensors_model
from tests.support.remote_servers import Faults, RangeServer

USER, PASSWORD, TOKEN, SIGNATURE = "planted-user", "PASSWORD-9f3a", "TOKEN-77c1", "SIG-41be"
PLANTED = (USER, PASSWORD, TOKEN, SIGNATURE)
FAST = {"retries": 2, "backoff": 0.001, "timeout": 5.0}
CHUNK = 64 << 10


@dataclass
class Target:
    """A source under test: its URL prefix (clean), options, faults and an upload."""

    kind: str
    base: str
    options: dict[str, Any] | None
    faults: Callable[[], Faults]
    put: Callable[[str, bytes], None]
    dead: Callable[[int], tuple[str, dict[str, Any] | None]]  # a base, options: port closed

    def planted(self, key: str, base: str | None = None) -> str:
        parts = urlsplit((base or self.base) + key)
        netloc = f"{USER}:{PASSWORD}@{parts.netloc}"
        query = f"token={TOKEN}&X-Amz-Signature={SIGNATURE}"
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


@pytest.fixture
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    """The source ``request.param`` names (``http`` or a store), faults cleared after."""
    if request.param == "http":
        server: RangeServer = request.getfixturevalue("range_server")

        def put(key: str, data: bytes) -> None:
            (server.root / key).parent.mkdir(parents=True, exist_ok=True)
            (server.root / key).write_bytes(data)

        def dead_http(port: int) -> tuple[str, dict[str, Any] | None]:
            return f"http://127.0.0.1:{port}/", None

        yield Target("http", server.url + "/", None, lambda: server.faults, put, dead_http)
        return
    store = session_store(request, request.param)

    def dead_store(port: int) -> tuple[str, dict[str, Any] | None]:
        return store.prefix, store.make_options(f"http://127.0.0.1:{port}")

    faults = lambda: store.proxy.faults  # noqa: E731 - the proxy's current faults
    yield Target(request.param, store.prefix, store.faulty_options, faults, store.put, dead_store)
    store.proxy.reset()


def _texts(exc: BaseException) -> list[str]:
    return ["".join(traceback.format_exception(exc)), repr(exc)]


def _raised(call: Callable[[], object], kind: type[BaseException]) -> BaseException:
    with pytest.raises(kind) as caught:
        call()
    return caught.value


async def _raised_async(
    call: Callable[[], Awaitable[object]], kind: type[BaseException]
) -> BaseException:
    with pytest.raises(kind) as caught:
        await call()
    return caught.value


Case = Callable[[Target, str, Path, pytest.MonkeyPatch], Awaitable[tuple[str, list[str]]]]
CASES: dict[str, Case] = {}


def case(fn: Case) -> Case:
    CASES[fn.__name__.removeprefix("_")] = fn
    return fn


def _open(t: Target, url: str, **options: Any) -> ap.Pager:
    return ap.open(url, budget_bytes=1 << 30, storage_options=t.options,
                   remote_options=FAST, **options)  # fmt: skip


#: Opening an object that does not exist, three ways: the call, what it raises, its words.
MISSING: dict[str, tuple[Callable[[Target, str], object], type[BaseException], str]] = {
    "open_missing": (lambda t, url: _open(t, url), ap.SourceError, "{url}: cannot open"),
    "read_index_missing": (
        lambda t, url: ap.read_index(url, storage_options=t.options),
        FileNotFoundError,
        "no such object: '{url}'",
    ),
    "source_missing": (
        lambda t, url: ObjectStoreSource(url, storage_options=t.options),
        FileNotFoundError,
        "no such object: '{url}'",
    ),
}


def _missing(call: Callable[[Target, str], object], kind: type[BaseException], says: str) -> Case:
    async def run(t: Target, key: str, tmp: Path, mp: pytest.MonkeyPatch) -> tuple[str, list[str]]:
        exc = _raised(lambda: call(t, t.planted("absent/m.safetensors")), kind)
        return says.format(url=f"{t.base}absent/m.safetensors"), _texts(exc)

    return run


for _name, (_call, _kind, _says) in MISSING.items():
    CASES[_name] = _missing(_call, _kind, _says)


@case
async def _open_async_missing(
    t: Target, key: str, tmp: Path, mp: pytest.MonkeyPatch
) -> tuple[str, list[str]]:
    url = t.planted("absent/m.safetensors")
    exc = await _raised_async(
        lambda: ap.open_async(url, budget_bytes=1 << 30, storage_options=t.options), ap.SourceError
    )
    return f"{t.base}absent/m.safetensors: cannot open", _texts(exc)


@case
async def _refused_at_open(
    t: Target, key: str, tmp: Path, mp: pytest.MonkeyPatch
) -> tuple[str, list[str]]:
    t.faults().fail_next, t.faults().fail_status = 5, 403
    exc = _raised(lambda: _open(t, t.planted(key)), ap.SourceError)
    return f"{t.base}{key}", _texts(exc)


#: Reads after a good open that fail: the faults armed, and what the error says.
FAILED_READS: dict[str, tuple[dict[str, int], str]] = {
    "refused_read": ({"fail_next": 5, "fail_status": 403}, "PermissionDenied"),
    "changed_version": ({"fail_next": 5, "fail_status": 412}, "changed since it was opened"),
    "short_read": ({"drop_next": 3}, "failed after 3 attempts"),
    "5xx_after_retries": ({"fail_next": 3, "fail_status": 503}, "failed after 3 attempts"),
}


def _failed_read(faults: dict[str, int], expected: str) -> Case:
    async def run(t: Target, key: str, tmp: Path, mp: pytest.MonkeyPatch) -> tuple[str, list[str]]:
        pager = _open(t, t.planted(key))
        for name, value in faults.items():
            setattr(t.faults(), name, value)
        with pytest.raises(ap.SourceError) as caught:
            async with pager.acquire(next(iter(pager.index.tensors))):
                pass
        await pager.close()
        return expected, _texts(caught.value)

    return run


for _name, (_faults, _expected) in FAILED_READS.items():
    CASES[_name] = _failed_read(_faults, _expected)


@case
async def _timeout(t: Target, key: str, tmp: Path, mp: pytest.MonkeyPatch) -> tuple[str, list[str]]:
    url = t.planted(key)
    pager = ap.open(url, budget_bytes=1 << 30, storage_options=t.options,
                    remote_options={"retries": 0, "timeout": 0.2})  # fmt: skip
    hold = threading.Event()
    t.faults().hold, t.faults().hold_after = hold, t.faults().gets
    try:
        with pytest.raises(ap.SourceError) as caught:
            async with pager.acquire(next(iter(pager.index.tensors))):
                pass
    finally:
        hold.set()
        await pager.close()
    return "TimeoutError", _texts(caught.value)


@case
async def _unreachable(
    t: Target, key: str, tmp: Path, mp: pytest.MonkeyPatch
) -> tuple[str, list[str]]:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        base, options = t.dead(s.getsockname()[1])
    url = t.planted(key, base)
    exc = _raised(
        lambda: ap.open(url, budget_bytes=1 << 30, storage_options=options), ap.SourceError
    )
    return f"{base}{key}: HEAD", _texts(exc)


@case
async def _no_credentials(
    t: Target, key: str, tmp: Path, mp: pytest.MonkeyPatch
) -> tuple[str, list[str]]:
    for var in list(os.environ):
        if var.startswith(("AWS_", "GOOGLE_", "AZURE_")):
            mp.delenv(var)
    exc = _raised(lambda: ap.open(t.planted(key), budget_bytes=1 << 30), ap.SourceError)
    return f"{t.base}{key}: no credentials", _texts(exc)


@case
async def _bad_option(
    t: Target, key: str, tmp: Path, mp: pytest.MonkeyPatch
) -> tuple[str, list[str]]:
    options = dict(t.options or {}, not_an_option=PASSWORD)
    exc = _raised(lambda: ap.open(t.planted(key), budget_bytes=1 << 30, storage_options=options),
                  ap.SourceError)  # fmt: skip
    return f"{t.base}{key}: cannot configure the store", _texts(exc)


@case
async def _cache_write_failure(
    t: Target, key: str, tmp: Path, mp: pytest.MonkeyPatch
) -> tuple[str, list[str]]:
    def no_space(self: DiskCache, path: Path, data: memoryview, trailer: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    mp.setattr(DiskCache, "_write_file", no_space)
    await read_all_cached(t.planted(key), tmp / "cache", CHUNK, storage_options=t.options)
    return "cannot store a chunk", []


@case
async def _cache_damage(
    t: Target, key: str, tmp: Path, mp: pytest.MonkeyPatch
) -> tuple[str, list[str]]:
    url, cache = t.planted(key), tmp / "cache"
    await read_all_cached(url, cache, CHUNK, storage_options=t.options)
    for chunk in cache.rglob("*.chunk"):
        flip_byte(chunk, 3)
    await read_all_cached(url, cache, CHUNK, storage_options=t.options)
    return f"of {t.base}{key} is damaged", []


@case
async def _reprs(t: Target, key: str, tmp: Path, mp: pytest.MonkeyPatch) -> tuple[str, list[str]]:
    url = t.planted(key)
    seen = []
    async with _open(t, url, cache_dir=tmp / "cache") as pager:
        seen += [repr(pager), repr(pager.source), repr(pager.index), str(pager.index.path)]
        seen += [repr(pager.source.stats), repr(pager.source.cache)]  # type: ignore[attr-defined]
        async with pager.acquire(next(iter(pager.index.tensors))) as lease:
            seen.append(repr(lease))
    location = remote_location(url, t.options)
    reader = location.open_reader()
    seen += [repr(location), str(location.url), repr(reader), str(reader.name)]
    with ObjectStoreSource(url, storage_options=t.options, cache_dir=tmp / "c2") as src:
        seen += [repr(src), str(src.url)]
    seen.append(repr(ap.read_index(url, storage_options=t.options)))
    return f"ObjectStoreSource('{t.base}{key}'", seen


#: Secrets the stores' own storage options hold (moto's secret key, Azurite's key).
OPTION_SECRETS = ("aws_secret_access_key", "account_key")
NOT_FOR_HTTP = {"no_credentials", "bad_option"}  # an HTTP URL takes no storage options
PAIRS = [
    (k, p) for k in ["http", *STORES] for p in CASES if not (k == "http" and p in NOT_FOR_HTTP)
]


@pytest.mark.parametrize(("target", "path"), PAIRS, indirect=["target"])
async def test_no_secret_in_any_message_repr_or_log(
    target: Target,
    path: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    local = tmp_path / "m.safetensors"
    write_safetensors_model(local, n_layers=1)
    key = f"{tmp_path.name}/m.safetensors"
    target.put(key, local.read_bytes())
    caplog.set_level(logging.DEBUG)
    expected, texts = await CASES[path](target, key, tmp_path, monkeypatch)
    for record in caplog.records:
        texts.append(record.getMessage())
        if record.exc_info and record.exc_info[1] is not None:
            texts += _texts(record.exc_info[1])
    joined = "\n".join(texts)
    assert expected in joined, (expected, texts[:3])  # the path was taken
    given = [v for k, v in (target.options or {}).items() if k in OPTION_SECRETS]
    leaks = [s for s in (*PLANTED, *given) if s in joined]
    assert not leaks, f"{leaks} in: {joined[:2000]}"
