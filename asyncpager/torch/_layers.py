"""Decoder layers paged while a forward pass runs on a worker thread.

How a layer's weights reach the worker (the design the issue asked to choose and
measure; figures in the README, ``scripts/bench_torch.py``):

- The forward pass runs on a worker thread; a forward pre-hook on every decoder layer
  binds that layer's leased tensors into its module just before it runs and a forward
  hook (``always_call``) unbinds them just after, whatever the layer's arguments. The
  hooks never call into the pager directly: they post *messages* to the event loop
  (``call_soon_threadsafe``), and the loop side acquires and releases.
- **Requested one layer early.** With ``prefetch_depth >= 1``, once layer *n* is
  granted the worker requests layer *n+1* (a demand ``acquire_layer`` that takes its
  leases when granted), so by the time the worker reaches *n+1* its leases are usually
  there and the pre-hook does not wait for a thread hop at all. Measured against a
  synchronous ``run_coroutine_threadsafe(...).result()`` per layer, this takes the hop
  (0.1-1 ms median, several ms under load) off the critical path of every layer.
- **One message per layer.** When layer *n*'s request is already granted, the
  pre-hook posts a single message that releases layer *n-1* (all its leases at once, on
  the loop) and requests *n+1*; otherwise it posts the release (and *n*'s request)
  first, waits, then requests *n+1*.
- **No deadlock.** A forward that waits for a layer holds no lease (the previous layer
  was released first, the next one is requested only after this one is granted), so
  concurrent forwards under a tight budget always make progress; the most a forward
  holds is two layers (the running one and the next, requested early).
- **Cancellation.** Cancelling a forward marks it; the worker stops at its next layer
  boundary (it cannot stop inside a torch kernel), every request of that forward is
  abandoned on the loop (granted leases released, pending acquires cancelled) and the
  caller's cancellation completes only after that, so the pager holds nothing of it.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._errors import PagerClosed
from ..pager._lease import LeaseGroup
from ._arena import Prepared
from ._skeleton import Skeleton, Slot
from ._tensors import weight_view

if TYPE_CHECKING:
    from ..pager._pager import Pager

__all__ = ["ForwardCancelled", "ForwardRun", "LayerHooks"]


class ForwardCancelled(Exception):
    """Raised inside the worker to stop a cancelled forward at a layer boundary."""


class _LayerRequest:
    """One ``acquire_layer`` on behalf of a forward: made on the loop, consumed by the
    worker. ``done`` is set (on the loop) once ``group`` or ``error`` is final."""

    __slots__ = ("abandoned", "done", "error", "group", "layer", "prepared", "task")

    def __init__(self, layer: int) -> None:
        self.layer = layer
        self.done = threading.Event()
        self.group: LeaseGroup | None = None
        self.error: BaseException | None = None
        self.task: asyncio.Task[LeaseGroup] | None = None
        self.abandoned = False
        #: the layer's dequantization (quantized weights only; see ``_gguf.py``)
        self.prepared: Prepared | None = None


class ForwardRun:
    """The state of one forward pass. The worker owns ``requests``/``held``; the loop
    only reads them when the run is cancelled or finished."""

    __slots__ = (
        "bind_ns",
        "binds",
        "bound",
        "cancelled",
        "held",
        "requests",
        "tasks",
        "wait_ns",
        "waiting",
    )

    def __init__(self) -> None:
        self.cancelled = False
        self.requests: dict[int, _LayerRequest] = {}
        self.held: _LayerRequest | None = None
        self.waiting: _LayerRequest | None = None
        self.tasks: set[asyncio.Task[LeaseGroup]] = set()
        self.wait_ns = 0
        self.bind_ns = 0
        self.bound: int | None = None
        self.binds = 0


class LayerHooks:
    """Forward hooks on every decoder layer of ``skeleton`` paging its weights through
    ``pager``. One instance per PagedCausalLM; per-forward state is thread-local."""

    def __init__(
        self,
        pager: Pager,
        skeleton: Skeleton,
        loop: asyncio.AbstractEventLoop,
        *,
        depth: int,
        early: bool | None = None,
        names: dict[int, list[str]] | None = None,
    ) -> None:
        self._pager = pager
        self._loop = loop
        self._early = depth >= 1 if early is None else early
        #: what a layer request acquires when not the whole index layer (MoE: no experts)
        self._names = names
        self._local = threading.local()
        self._bind_lock = threading.Lock()
        self._bound: dict[int, int] = {}
        self._quantized = skeleton.quantized
        self._prepared: dict[int, Prepared] = {}
        order = sorted(skeleton.layer_modules)
        self._next = {n: order[i + 1] for i, n in enumerate(order[:-1])}
        # the next token's first layer, hinted when the last layer starts (see module doc)
        self._wrap = {order[-1]: order[0]} if self._early and order else {}
        self._layer_ckpt = {n: list(skeleton.layer_names[n]) for n in order}
        self._bindings: dict[int, list[tuple[str, list[Slot], torch.dtype | None]]] = {
            n: [(ck, skeleton.slots[ck], skeleton.convert[ck]) for ck in skeleton.layer_names[n]]
            for n in order
        }
        self._handles = []
        for n, module in skeleton.layer_modules.items():
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(n)))
            self._handles.append(module.register_forward_hook(self._post_hook(n), always_call=True))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    # ------------------------------------------------------------------ worker side

    def run_forward(self, run: ForwardRun, call: Callable[[], Any]) -> Any:
        """Run ``call`` (the model's forward) on this worker thread as ``run``."""
        self._local.run = run
        try:
            return call()
        finally:
            self._local.run = None
            self._unbind(run)
            leftovers = [r for r in (run.held, *run.requests.values()) if r is not None]
            run.held = None
            run.requests.clear()
            if leftovers:
                self._post(run, None, [], leftovers)

    def current_run(self) -> ForwardRun:
        """The forward running on this worker thread."""
        return self._current()

    def _current(self) -> ForwardRun:
        run: ForwardRun | None = getattr(self._local, "run", None)
        if run is None:
            raise RuntimeError(
                "a paged decoder layer ran outside PagedCausalLM.forward(): its weights "
                "are on the meta device; call the model through lm.forward()"
            )
        return run

    def _pre_hook(self, layer: int) -> Callable[[nn.Module, Any], None]:
        def hook(module: nn.Module, args: Any) -> None:
            run = self._current()
            if run.cancelled:
                raise ForwardCancelled
            release, run.held = run.held, None
            req = run.requests.pop(layer, None)
            start = []
            if req is None:
                req = _LayerRequest(layer)
                start.append(req)
            run.held = req  # from here on, the finally of run_forward owns it
            nxt = self._next.get(layer) if self._early else None
            if nxt is not None and nxt in run.requests:
                nxt = None
            hint = self._wrap.get(layer)
            if req.done.is_set():  # the common case with early requests: one message
                if nxt is not None:
                    start.append(run.requests.setdefault(nxt, _LayerRequest(nxt)))
                if release is not None or start or hint is not None:
                    self._post(run, release, start, hint=hint)
            else:
                if release is not None or start or hint is not None:
                    self._post(run, release, start, hint=hint)
                run.waiting = req
                t0 = perf_counter_ns()
                if not run.cancelled:  # else the loop may have missed run.waiting
                    req.done.wait()
                run.wait_ns += perf_counter_ns() - t0
                run.waiting = None
                if run.cancelled:
                    raise ForwardCancelled
                if nxt is not None and req.error is None:
                    self._post(run, None, [run.requests.setdefault(nxt, _LayerRequest(nxt))])
            if req.error is not None:
                raise req.error
            assert req.group is not None
            t0 = perf_counter_ns()
            self._bind(layer, req)
            run.bound = layer
            run.bind_ns += perf_counter_ns() - t0
            run.binds += 1

        return hook

    def _post_hook(self, layer: int) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            run = getattr(self._local, "run", None)
            if run is not None and run.bound == layer:
                self._unbind(run)

        return hook

    # A module's parameters are shared by every forward: concurrent forwards in the
    # same layer share one binding (their leases are on the same resident tensors, so
    # the bound memory is valid while any of them holds its lease), counted per layer.

    def _bind(self, layer: int, req: _LayerRequest) -> None:
        group = req.group
        assert group is not None
        with self._bind_lock:
            count = self._bound.get(layer, 0)
            if self._quantized is not None:
                self._bind_quantized(layer, req, shared=count > 0)
                self._bound[layer] = count + 1
                return
            self._bound[layer] = count + 1
            if count:
                return
            for ck, slots, convert in self._bindings[layer]:
                # The tensor's own array, not this lease's (in debug mode each lease
                # has a view of its own, checked unreferenced at its release): the
                # binding outlives this forward's lease while others hold theirs.
                lease = group[ck]
                shared = lease._entry.array
                t = weight_view(shared if shared is not None else lease.array, convert)
                for slot in slots:
                    slot.table[slot.attr] = t

    def _bind_quantized(self, layer: int, req: _LayerRequest, *, shared: bool) -> None:
        """Bind the layer's dequantized tensors (waiting for the dequant thread), or,
        when another forward has the layer bound already, give this one's back."""
        assert self._quantized is not None
        prepared = req.prepared
        assert prepared is not None
        if shared:
            req.prepared = None
            self._quantized.give_back(prepared)
            return
        prepared.future.result()  # raises what dequantizing raised
        req.prepared = None
        self._prepared[layer] = prepared
        for ck, slots, _ in self._bindings[layer]:
            t = prepared.tensors[ck]
            for slot in slots:
                slot.table[slot.attr] = t

    def _unbind(self, run: ForwardRun) -> None:
        layer, run.bound = run.bound, None
        if layer is None:
            return
        with self._bind_lock:
            count = self._bound[layer] - 1
            self._bound[layer] = count
            if count:
                return
            prepared = self._prepared.pop(layer, None)
            if prepared is not None and self._quantized is not None:
                self._quantized.give_back(prepared)
            for _, slots, _ in self._bindings[layer]:
                for slot in slots:
                    slot.table[slot.attr] = slot.placeholder

    def _post(
        self,
        run: ForwardRun,
        release: _LayerRequest | None,
        start: list[_LayerRequest],
        abandon: list[_LayerRequest] | None = None,
        hint: int | None = None,
    ) -> None:
        self._loop.call_soon_threadsafe(self._on_loop, run, release, start, abandon or [], hint)

    # ------------------------------------------------------------------ loop side

    def _on_loop(
        self,
        run: ForwardRun,
        release: _LayerRequest | None,
        start: list[_LayerRequest],
        abandon: list[_LayerRequest],
        hint: int | None,
    ) -> None:
        if release is not None:
            self._release(release)
        if hint is not None and not self._pager.closed:
            self._pager.prefetch(self._layer_names(hint))
        for req in start:
            if run.cancelled or self._pager.closed:
                self._fail(req, ForwardCancelled() if run.cancelled else _closed())
                continue
            task = self._loop.create_task(
                self._acquire(req), name=f"asyncpager:torch:layer{req.layer}"
            )
            req.task = task
            run.tasks.add(task)
            task.add_done_callback(functools.partial(self.granted, run, req))
        for req in abandon:
            self._abandon(req)

    def _layer_names(self, layer: int) -> list[str]:
        return self._pager.layers[layer] if self._names is None else self._names[layer]

    async def _acquire(self, req: _LayerRequest) -> LeaseGroup:
        if self._names is not None:
            return await self._pager.acquire_many(self._names[req.layer])
        return await self._pager.acquire_layer(req.layer)

    def granted(self, run: ForwardRun, req: _LayerRequest, task: asyncio.Task[LeaseGroup]) -> None:
        """On the loop: ``req``'s acquire ended; hand its result to the worker (or
        release it, when the request was abandoned meanwhile)."""
        run.tasks.discard(task)
        if task.cancelled():
            error: BaseException | None = ForwardCancelled()
            group = None
        else:
            error = task.exception()
            group = None if error is not None else task.result()
        if req.abandoned:
            if group is not None:
                group.release()
            return
        req.group = group
        req.error = error
        if group is not None and self._quantized is not None:
            req.prepared = self._quantized.prepare(group, self._layer_ckpt[req.layer])
        req.done.set()

    def _release(self, req: _LayerRequest) -> None:
        """Release ``req``'s leases (on the loop), after any dequantization still
        reading them has finished; its arena goes back to the free set."""
        group, req.group = req.group, None
        prepared, req.prepared = req.prepared, None
        if prepared is not None and self._quantized is not None:
            self._quantized.give_back(prepared)
        if group is None:
            return
        if prepared is None or prepared.future.done():
            group.release()
        else:
            loop = self._loop
            prepared.future.add_done_callback(lambda _: loop.call_soon_threadsafe(group.release))

    def _fail(self, req: _LayerRequest, error: BaseException) -> None:
        req.error = error
        req.done.set()

    def _abandon(self, req: _LayerRequest) -> None:
        req.abandoned = True
        if req.group is not None:
            self._release(req)
        elif req.task is not None and not req.task.done():
            req.task.cancel()
        if not req.done.is_set():
            self._fail(req, ForwardCancelled())

    def cancel(self, run: ForwardRun) -> None:
        """On the loop: stop ``run`` at its next layer boundary; wake its worker."""
        run.cancelled = True
        waiting = run.waiting
        if waiting is not None and not waiting.done.is_set():
            self._abandon(waiting)


def _closed() -> BaseException:
    return PagerClosed("the pager is closed")
