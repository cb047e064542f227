"""Load-test pieces shared by ``scripts/load_server.py`` and ``tests/test_server.py``:
run the server as a subprocess, drive it with concurrent aiohttp clients (some of
which disconnect mid-request), check every answer against the in-process reference,
and wait for the server to settle.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from types import TracebackType
from typing import Any

import aiohttp

from .model import forward, input_vector, read_layers

__all__ = [
    "Outcome",
    "Plan",
    "ServerProcess",
    "Summary",
    "check_outcomes",
    "expected_results",
    "get_json",
    "percentile",
    "plan_requests",
    "run_load",
    "summarize_outcomes",
    "wait_quiet",
]

REPO = Path(__file__).resolve().parents[2]


class ServerProcess:
    """``python -m examples.server`` on a free loopback port (``--port 0``; the port
    is read from the server's ``listening on`` line). Its output is collected; leaving
    the ``async with`` block kills it if it is still running."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.url = ""
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._listening = asyncio.Event()
        self._readers = [
            asyncio.create_task(self._read(proc.stdout, self.stdout), name="server:stdout"),
            asyncio.create_task(self._read(proc.stderr, self.stderr), name="server:stderr"),
        ]

    @classmethod
    async def start(
        cls,
        model: Path,
        budget: int | str,
        *args: str,
        startup_timeout: float = 30.0,
    ) -> ServerProcess:
        """Start the server and wait for it to listen.

        Raises:
            RuntimeError: it exited or did not listen within ``startup_timeout``.
        """
        path = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "examples.server",
            str(model),
            "--budget",
            str(budget),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            *args,
            cwd=REPO,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        server = cls(proc)
        exited = asyncio.create_task(proc.wait(), name="server:wait")
        listening = asyncio.create_task(server._listening.wait(), name="server:listening")
        try:
            await asyncio.wait(
                [exited, listening], timeout=startup_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (exited, listening):
                task.cancel()
            await asyncio.gather(exited, listening, return_exceptions=True)
        if not server.url:
            await server.aclose()
            raise RuntimeError(f"the server did not start:\n{server.stderr_text}")
        return server

    async def _read(self, stream: asyncio.StreamReader | None, lines: list[str]) -> None:
        assert stream is not None
        while line := await stream.readline():
            text = line.decode(errors="replace")
            lines.append(text)
            if text.startswith("listening on ") and not self.url:
                self.url = text.removeprefix("listening on ").strip()
                self._listening.set()

    @property
    def stderr_text(self) -> str:
        return "".join(self.stderr)

    @property
    def stdout_text(self) -> str:
        return "".join(self.stdout)

    async def stop(self, sig: signal.Signals = signal.SIGINT, timeout: float = 20.0) -> int:
        """Send ``sig`` and wait for the exit code (killing it after ``timeout``)."""
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
            try:
                async with asyncio.timeout(timeout):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
        return await self._finish()

    async def aclose(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self._finish()

    async def _finish(self) -> int:
        code = await self.proc.wait()
        await asyncio.gather(*self._readers, return_exceptions=True)
        return code

    async def __aenter__(self) -> ServerProcess:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


# ---------------------------------------------------------------------- clients


@dataclass(frozen=True, slots=True)
class Plan:
    """One request: its input (a seed, sent as the seed or as the vector itself) and
    whether the client disconnects before the answer."""

    index: int
    seed: int
    as_vector: bool
    disconnect: bool


@dataclass(slots=True)
class Outcome:
    plan: Plan
    status: str  # "ok", "disconnected", "http_<code>", "error"
    latency_s: float
    body: dict[str, Any] | None = None
    error: str | None = None


def plan_requests(n: int, disconnect_share: float, *, distinct_inputs: int = 16) -> list[Plan]:
    """``n`` requests over ``distinct_inputs`` inputs; disconnects spread evenly."""
    return [
        Plan(
            index=i,
            seed=i % distinct_inputs,
            as_vector=(i // distinct_inputs) % 2 == 1,
            disconnect=math.floor((i + 1) * disconnect_share) > math.floor(i * disconnect_share),
        )
        for i in range(n)
    ]


async def run_load(
    session: aiohttp.ClientSession,
    url: str,
    plans: Sequence[Plan],
    *,
    concurrency: int,
    disconnect_after_s: float = 0.05,
    layer_delay_ms: float = 20.0,
    request_timeout_s: float = 60.0,
) -> list[Outcome]:
    """Send ``plans`` with ``concurrency`` clients. A disconnecting client asks for
    ``layer_delay_ms`` of simulated compute per layer (so it is surely mid-request
    with leases held) and closes its connection after ``disconnect_after_s``."""
    queue = list(reversed(plans))
    outcomes: list[Outcome] = []

    async def client() -> None:
        while queue:
            outcomes.append(await send(queue.pop()))

    async def send(plan: Plan) -> Outcome:
        body: dict[str, Any] = (
            {"vector": input_vector(plan.seed).tolist()} if plan.as_vector else {"seed": plan.seed}
        )
        timeout = request_timeout_s
        if plan.disconnect:
            body["layer_delay_ms"] = layer_delay_ms
            timeout = disconnect_after_s
        t0 = perf_counter()
        try:
            async with session.post(
                f"{url}/v1/forward", json=body, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                data = await resp.json()
                status = "ok" if resp.status == 200 else f"http_{resp.status}"
                return Outcome(plan, status, perf_counter() - t0, data)
        except TimeoutError:
            status = "disconnected" if plan.disconnect else "error"
            return Outcome(plan, status, perf_counter() - t0, error="timeout")
        except aiohttp.ClientError as exc:
            return Outcome(plan, "error", perf_counter() - t0, error=repr(exc))

    clients = [asyncio.create_task(client(), name=f"client:{i}") for i in range(concurrency)]
    try:
        await asyncio.gather(*clients)
    finally:
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
    return sorted(outcomes, key=lambda o: o.plan.index)


def expected_results(model: Path, seeds: Sequence[int]) -> dict[int, dict[str, Any]]:
    """The result of the forward pass for each seed, computed in-process from the
    model file read by ``gguf.GGUFReader`` (not through asyncpager)."""
    layers = read_layers(model)
    return {seed: forward(input_vector(seed), layers) for seed in sorted(set(seeds))}


def check_outcomes(
    outcomes: Sequence[Outcome], expected: Mapping[int, Mapping[str, Any]]
) -> list[str]:
    """Problems with the answers: every completed request must match the reference
    (bytes exactly, floats to 1e-6)."""
    problems: list[str] = []
    for o in outcomes:
        if o.status != "ok":
            if not (o.status == "disconnected" and o.plan.disconnect):
                problems.append(f"request {o.plan.index}: {o.status} {o.error or o.body}")
            continue
        assert o.body is not None
        got, want = o.body["result"], expected[o.plan.seed]
        for key in ("layers", "size", "digest", "weights_crc32"):
            if got[key] != want[key]:
                problems.append(f"request {o.plan.index}: {key} {got[key]!r} != {want[key]!r}")
        got_floats = [got["checksum"], *got["norms"]]
        want_floats = [want["checksum"], *want["norms"]]
        if len(got_floats) != len(want_floats) or not all(
            math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
            for a, b in zip(got_floats, want_floats, strict=True)
        ):
            problems.append(f"request {o.plan.index}: norms or checksum differ")
    return problems


async def get_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
        resp.raise_for_status()
        data: dict[str, Any] = await resp.json()
        return data


async def wait_quiet(
    session: aiohttp.ClientSession, url: str, timeout: float = 15.0
) -> dict[str, Any]:
    """Poll ``/healthz`` until nothing is in flight (requests, loads, waiters,
    leases); returns the last health report.

    Raises:
        TimeoutError: still busy after ``timeout`` seconds.
    """
    busy = ("requests_in_flight", "loads_in_flight", "inflight_bytes", "waiting", "leases_held")
    health: dict[str, Any] = {}
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while True:
                health = await get_json(session, f"{url}/healthz")
                if not any(health[k] for k in busy):
                    return health
                await asyncio.sleep(0.05)
    raise TimeoutError(f"the server is still busy: {json.dumps(health)}")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1), nearest rank; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass(slots=True)
class Summary:
    """Client-side figures of one run."""

    seconds: float
    completed: int
    disconnected: int
    failed: int
    latencies: list[float] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        lat = self.latencies
        return (
            f"{self.completed} ok, {self.disconnected} disconnected, {self.failed} failed in "
            f"{self.seconds:.2f} s: {self.throughput:.1f} req/s; latency ms "
            f"p50 {percentile(lat, 0.5) * 1e3:.1f} p90 {percentile(lat, 0.9) * 1e3:.1f} "
            f"p99 {percentile(lat, 0.99) * 1e3:.1f} max {max(lat, default=0.0) * 1e3:.1f}"
        )


def summarize_outcomes(outcomes: Sequence[Outcome], seconds: float) -> Summary:
    return Summary(
        seconds=seconds,
        completed=sum(o.status == "ok" for o in outcomes),
        disconnected=sum(o.status == "disconnected" for o in outcomes),
        failed=sum(o.status not in ("ok", "disconnected") for o in outcomes),
        latencies=[o.latency_s for o in outcomes if o.status == "ok"],
    )
