"""``asyncpager serve`` as a real subprocess on a free loopback port (``--port 0``,
the port read from its ``listening on`` line). Synchronous (a reader thread per
pipe), so one server can be shared by tests running on different event loops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

REPO = Path(__file__).resolve().parents[2]


class Served:
    def __init__(
        self,
        model: Path | str,
        *args: str,
        budget: str = "500KiB",
        timeout: float = 120,
        torch_threads: int | None = 1,
    ) -> None:
        """Start the server and wait until it listens (tiny test models run fastest on
        one torch thread on a shared machine)."""
        if torch_threads is not None:
            args = ("--torch-threads", str(torch_threads), *args)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "asyncpager", "serve", str(model), "--budget", budget,
             "--host", "127.0.0.1", "--port", "0", "--model-name", "tiny", *args],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.url = ""
        self._listening = threading.Event()
        self._readers = [
            threading.Thread(target=self._read, args=(stream, lines), daemon=True)
            for stream, lines in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr))
        ]
        for reader in self._readers:
            reader.start()
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the server did not start:\n{self.stderr_text}")

    def _read(self, stream: object, lines: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            lines.append(line)
            if line.startswith("listening on ") and not self.url:
                self.url = line.removeprefix("listening on ").strip()
                self._listening.set()

    @property
    def stderr_text(self) -> str:
        return "".join(self.stderr)

    @property
    def stdout_text(self) -> str:
        return "".join(self.stdout)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._close_pipes()
        return code

    def _close_pipes(self) -> None:
        for reader in self._readers:
            reader.join(10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close_pipes()

    def __enter__(self) -> Served:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()
