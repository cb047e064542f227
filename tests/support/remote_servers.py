"""Real servers on loopback for the object-storage tests: an aiohttp server that
honours Range/If-Match and can inject faults, and moto's standalone S3 server.
Both run on a thread of their own, bound to a free port on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any

from aiohttp import web

__all__ = ["MotoS3", "RangeServer", "moto_s3_server"]


@dataclass
class Faults:
    """Faults the next requests get (each counter is consumed per GET)."""

    fail_next: int = 0  # answer fail_status...
    fail_status: int = 500  # ...(403: refused credentials, 412: a changed version)
    drop_next: int = 0  # send half the body, then close the connection
    delay: float = 0.0  # seconds before answering every GET
    hold: threading.Event | None = None  # GETs wait until it is set...
    hold_after: int = 0  # ...once this many GETs have been answered
    gets: int = 0
    no_etag: bool = False  # answer without ETag (some HTTP servers do)
    md5_etag: bool = False  # the ETag is the file's MD5, as S3's for a single-part upload
    etag: str | None = None  # this ETag whatever the file (one that looks like an MD5...)
    corrupt_next: int = 0  # flip byte [corrupt_next] of the body (damage in transit)


@dataclass
class Served:
    method: str
    path: str
    range: str | None
    status: int
    nbytes: int


@dataclass
class RangeServer:
    """Serves the files under ``root`` (GET/HEAD, single Range, If-Match, ETag from
    inode+mtime+size so a replaced file gets a new one)."""

    root: Path
    faults: Faults = field(default_factory=Faults)
    log: list[Served] = field(default_factory=list)
    port: int = 0
    _app: AppThread = field(init=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def bytes_sent(self, path: str | None = None) -> int:
        return sum(s.nbytes for s in self.log if path is None or s.path == path)

    def gets(self) -> list[Served]:
        return [s for s in self.log if s.method == "GET"]

    handled: int = 0  # requests whose handler has finished, whatever happened

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._answer(request)
        except ConnectionResetError:  # the client went away (a cancelled read)
            return web.Response(status=499)
        finally:
            self.handled += 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        rel = request.match_info["tail"]
        path = self.root / rel
        range_header = request.headers.get("Range")
        try:
            st = path.stat()
            if not path.is_file():  # a directory is no object, as in S3
                raise FileNotFoundError(rel)
        except FileNotFoundError:
            self.log.append(Served(request.method, rel, range_header, 404, 0))
            return web.Response(status=404)
        etag = f'"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"'
        if self.faults.md5_etag:
            etag = f'"{hashlib.md5(path.read_bytes()).hexdigest()}"'
        etag = self.faults.etag or etag
        headers = {
            "ETag": etag,
            "Last-Modified": formatdate(st.st_mtime, usegmt=True),
            "Accept-Ranges": "bytes",
        }
        if self.faults.no_etag:
            del headers["ETag"]
            since = request.if_unmodified_since
            if since is not None and int(st.st_mtime) > since.timestamp():
                self.log.append(Served(request.method, rel, range_header, 412, 0))
                return web.Response(status=412)
        if request.method == "GET":
            faults = self.faults
            faults.gets += 1
            if faults.hold is not None and faults.gets > faults.hold_after:
                await asyncio.get_running_loop().run_in_executor(None, faults.hold.wait)
            if faults.delay:
                await asyncio.sleep(faults.delay)
            if faults.fail_next > 0:
                faults.fail_next -= 1
                self.log.append(Served("GET", rel, range_header, faults.fail_status, 0))
                return web.Response(status=faults.fail_status, text="injected failure")
        if_match = request.headers.get("If-Match")
        if if_match is not None and if_match != etag and if_match != "*":
            self.log.append(Served(request.method, rel, range_header, 412, 0))
            return web.Response(status=412)
        start, end = 0, st.st_size
        status = 200
        if range_header and range_header.startswith("bytes="):
            first, _, last = range_header[6:].partition("-")
            start = int(first)
            end = min(int(last) + 1, st.st_size) if last else st.st_size
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{st.st_size}"
        if request.method == "HEAD":
            self.log.append(Served("HEAD", rel, None, 200, 0))
            headers["Content-Length"] = str(st.st_size)
            return web.Response(status=200, headers=headers)
        data = _read_range(path, start, end)
        if self.faults.corrupt_next > 0 and data:
            at = self.faults.corrupt_next % len(data)  # another byte each time
            self.faults.corrupt_next -= 1
            data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = len(data)
        await resp.prepare(request)
        if self.faults.drop_next > 0:
            self.faults.drop_next -= 1
            self.log.append(Served("GET", rel, range_header, -1, len(data) // 2))
            await resp.write(data[: len(data) // 2])
            assert request.transport is not None
            request.transport.close()
            return resp
        self.log.append(Served("GET", rel, range_header, status, len(data)))  # before the
        await resp.write(data)  # client can see the answer, so a test reading the log has it
        await resp.write_eof()
        return resp

    def start(self) -> RangeServer:
        self._app = AppThread(self._handle, "test:range-server").start()
        self.port = self._app.port
        return self

    def stop(self) -> None:
        if self.faults.hold is not None:
            self.faults.hold.set()
        self._app.stop()


class AppThread:
    """An aiohttp app routing every request to ``handler``, on a free port of
    127.0.0.1, served by an event loop on a thread of its own."""

    def __init__(self, handler: Any, name: str) -> None:
        self.handler = handler
        self.name = name
        self.port = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.on_cleanup: list[Any] = []  # coroutines functions run on the loop at stop

    def start(self) -> AppThread:
        ready = threading.Event()

        async def serve() -> None:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self.handler)
            self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
            ready.set()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self.loop = loop
            loop.run_until_complete(serve())
            loop.run_forever()
            assert self._runner is not None
            loop.run_until_complete(self._runner.cleanup())
            for cleanup in self.on_cleanup:
                loop.run_until_complete(cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread is not None:
            self._thread.join(10)


def _read_range(path: Path, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


@dataclass
class MotoS3:
    endpoint: str
    bucket: str
    key_id: str = "testing-key-id"
    secret: str = "testing-secret-DO-NOT-LOG-4f9c2a"

    @property
    def storage_options(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "region": "us-east-1",
            "aws_access_key_id": self.key_id,
            "aws_secret_access_key": self.secret,
            "virtual_hosted_style_request": False,
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.key_id,
            aws_secret_access_key=self.secret,
        )

    def upload(self, path: Path, key: str) -> str:
        self.client().upload_file(str(path), self.bucket, key)
        return f"s3://{self.bucket}/{key}"


@contextlib.contextmanager
def moto_s3_server() -> Iterator[MotoS3]:
    """moto's standalone S3 server on a free loopback port, with one bucket."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("MOTO_ALLOW_NONEXISTENT_REGION", "true")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        s3 = MotoS3(f"http://{host}:{port}", "models")
        s3.client().create_bucket(Bucket=s3.bucket)
        yield s3
    finally:
        server.stop()


def serve_static(root: Path) -> None:
    """Serve ``root`` with aiohttp's static files (sendfile, Range, ETag, If-Match) on a
    free loopback port until killed; prints the port. For the benchmarks, which run it
    in a process of its own so it does not share the client's GIL."""
    app = web.Application()
    app.router.add_static("/", root, follow_symlinks=True)

    async def main() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        print(server.sockets[0].getsockname()[1], flush=True)  # type: ignore[attr-defined]
        await asyncio.Event().wait()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:  # pragma: no cover
        asyncio.run(main())


if __name__ == "__main__":
    import sys

    serve_static(Path(sys.argv[1]))
