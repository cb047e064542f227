"""Mixture-of-experts layers paged by expert: transformers' experts interface with a
backend registered under the name ``"asyncpager"``.

How a MoE layer runs (on the forward's worker thread, between the layer hooks of
``_layers.py``, which lease the layer's attention, norms and shared experts as for a
dense model; routers are resident):

- The router has picked ``top_k`` experts per token; the backend asks the loop for
  the union of the batch's experts in ONE request: the cached ones are lent at once,
  the rest acquired together (``acquire_many`` of their per-expert tensors, or
  ``acquire_rows`` of each expert's rows of fused ``[E, ...]`` tensors). A routed set
  larger than the planned request size (``_expert_cache.plan_expert_budget``) is
  fetched and computed in chunks.
- The math is transformers' own (``batched_mm``'s accumulation: weighted per-slot
  outputs summed over the ``top_k`` slots), one expert at a time.
- After the layer, the loop scores the routed experts (``ExpertCachePolicy``) and
  keeps the leases of the hot ones (the pager never evicts a leased tensor), up to
  the cache's share of the budget; the others are released.
- Speculative prefetch: before waiting for its own experts, the worker applies the
  routers of the next ``prefetch_depth`` MoE layers to this layer's input and asks the
  pager to prefetch the guessed experts (``pager.prefetch``: background priority,
  skipped when there is no room, evictable). A wrong guess costs reads, never
  correctness; guesses are scored against the experts actually routed.

Invariants:
- Leases are taken and released on the loop only; the worker reads tensors of leases
  it was lent, between the grant and its ``done`` message.
- A cached expert in use by a forward is never released; closing releases the cache.
- Cancelling a forward abandons its pending expert request like a layer request
  (``LayerHooks.cancel``); leases granted to it are released.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, final

import torch

from .._errors import BudgetExceeded, PagerClosed
from ..pager._lease import Lease, LeaseGroup
from ..pager._pool import block_capacity
from ._expert_cache import CachePolicyName, ExpertBudget, ExpertCachePolicy, plan_expert_budget
from ._expert_map import ExpertLayout, ExpertParam, LayerExperts
from ._expert_math import Weights, compute_experts
from ._layers import ForwardCancelled, ForwardRun, LayerHooks, _LayerRequest
from ._skeleton import Skeleton
from ._tensors import weight_view

if TYPE_CHECKING:
    from ..pager._pager import Pager

__all__ = ["BACKEND", "ExpertPager", "ExpertStats", "plan_experts", "register_backend"]

BACKEND = "asyncpager"
Key = tuple[int, int]


def register_backend() -> None:
    """Register the paged experts forward in transformers' ``ExpertsInterface``."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if BACKEND not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(BACKEND, _paged_experts_forward)


def _paged_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    bridge: ExpertPager | None = getattr(self, "_asyncpager_experts", None)
    if bridge is None:
        raise RuntimeError(
            "the 'asyncpager' experts implementation runs only inside PagedCausalLM.forward()"
        )
    return bridge.forward(self, hidden_states, top_k_index, top_k_weights)


@final
@dataclass(frozen=True, slots=True)
class ExpertStats:
    """Counts over a MoE LM's expert layers since open (or the last reset):
    ``routed`` experts the batches' routers selected (per layer call, the union of the
    batch), ``cache_hits`` of them lent from the expert cache, ``fetched`` requested
    from the pager (``routed - cache_hits``), ``guessed``/``guess_hits`` experts the
    speculative prefetch guessed for a layer and how many of them it then routed to,
    ``guess_scored`` routed experts of layers that had a guess."""

    routed: int
    cache_hits: int
    fetched: int
    guessed: int
    guess_hits: int
    guess_scored: int
    #: checkpoint bytes of the fetched experts
    fetched_bytes: int
    cached_experts: int
    cache_bytes: int

    @property
    def cache_hit_rate(self) -> float:
        return self.cache_hits / self.routed if self.routed else 0.0

    @property
    def guess_hit_rate(self) -> float:
        """Share of the routed experts (of layers that had a guess) that were guessed."""
        return self.guess_hits / self.guess_scored if self.guess_scored else 0.0


class _ExpertRequest(_LayerRequest):
    """One expert request of a forward: the cached experts lent and the leases of
    the others (``group``), for ``wanted`` experts of ``layer``."""

    __slots__ = ("chunk", "lent", "rest", "wanted")

    def __init__(self, layer: int, wanted: list[int]) -> None:
        super().__init__(layer)
        self.wanted = wanted
        self.lent: dict[int, Weights] = {}
        self.chunk: list[int] = []
        self.rest: list[int] = []


class _Cached:
    __slots__ = ("evict", "group", "nbytes", "users", "weights")

    def __init__(self, group: LeaseGroup, weights: Weights, nbytes: int) -> None:
        self.group = group
        self.weights = weights
        self.nbytes = nbytes
        self.users = 0
        self.evict = False


class ExpertPager:
    """The paged experts of one PagedCausalLM (see the module doc)."""

    def __init__(
        self,
        pager: Pager,
        layout: ExpertLayout,
        loop: asyncio.AbstractEventLoop,
        hooks: LayerHooks,
        plan: ExpertBudget,
        *,
        policy: CachePolicyName,
        depth: int,
        whole_layers: bool = False,
    ) -> None:
        #: read every expert of a layer whatever the routing, cache none, guess none
        #: (layer paging, the baseline the benchmark compares against)
        self.whole_layers = whole_layers
        if whole_layers:
            plan = ExpertBudget(0, plan.request_bytes, plan.early, plan.forwards)
            depth = 0
        self._pager = pager
        self._layout = layout
        self._loop = loop
        self._hooks = hooks
        self.plan = plan
        self._policy = ExpertCachePolicy(plan.cache_bytes, policy)
        self._cache: dict[Key, _Cached] = {}
        self._by_module = {id(le.module): le for le in layout.layers.values()}
        order = sorted(layout.layers)
        self._ahead = {n: order[i + 1 : i + 1 + depth] for i, n in enumerate(order)}
        self._charge = {n: expert_charge(pager, le) for n, le in layout.layers.items()}
        self._local = threading.local()
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(
            ("routed", "hits", "fetched", "guessed", "ghits", "gscored", "fbytes"), 0
        )
        for le in layout.layers.values():
            le.module._asyncpager_experts = self  # type: ignore[assignment]

    def remove(self) -> None:
        for le in self._layout.layers.values():
            le.module.__dict__.pop("_asyncpager_experts", None)

    def release_cache(self) -> None:
        """On the loop: release every cached expert (the LM is closing)."""
        for entry in self._cache.values():
            entry.weights = {}
            entry.group.release()
        self._cache.clear()

    def stats(self, *, reset: bool = False) -> ExpertStats:
        with self._lock:
            c = dict(self._counts)
            if reset:
                self._counts = dict.fromkeys(self._counts, 0)
        return ExpertStats(
            c["routed"],
            c["hits"],
            c["fetched"],
            c["guessed"],
            c["ghits"],
            c["gscored"],
            c["fbytes"],
            len(self._cache),
            sum(e.nbytes for e in self._cache.values()),
        )

    def _count(self, **delta: int) -> None:
        with self._lock:
            for k, v in delta.items():
                self._counts[k] += v

    # ------------------------------------------------------------------ worker side

    def forward(
        self,
        module: torch.nn.Module,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        le = self._by_module[id(module)]
        run = self._hooks.current_run()
        k = top_k_index.size(-1)
        wanted = sorted(e for e in set(top_k_index.reshape(-1).tolist()) if 0 <= e < le.num_experts)
        if self.whole_layers:
            wanted = list(range(le.num_experts))
        guesses: dict[int, set[int]] = getattr(self._local, "guesses", {})
        self._local.guesses = guesses
        guess = guesses.pop(le.layer, None)
        if guess is not None:
            self._count(ghits=len(guess.intersection(wanted)), gscored=len(wanted))
        self._count(routed=len(wanted))
        slots = top_k_index.reshape(-1)
        out = hidden.new_zeros(slots.numel(), hidden.size(-1))
        req: _ExpertRequest | None = _ExpertRequest(le.layer, wanted)
        first = True
        while req is not None:
            self._post(self._on_request, run, req, first)
            if first:
                self._guess(le, hidden)
                first = False
            built: dict[int, Weights] = {}
            try:
                self._wait(run, req)
                built = self._build(le, req)
                compute_experts(module, req.lent, built, hidden, slots, k, out)
            finally:
                rest = req.rest
                # the loop keeps or drops ``built`` (the only references left to
                # the leased arrays) before it releases their leases
                self._post(self._on_done, req, built)
                del built
            req = _ExpertRequest(le.layer, rest) if rest else None
        weighted = out * top_k_weights.reshape(-1, 1)  # promoted as transformers does
        return weighted.view(-1, k, hidden.size(-1)).sum(dim=1).to(hidden.dtype)

    def _wait(self, run: ForwardRun, req: _ExpertRequest) -> None:
        if not req.done.is_set():
            run.waiting = req
            if not run.cancelled:
                req.done.wait()
            run.waiting = None
        if run.cancelled:
            raise ForwardCancelled
        if req.error is not None:
            raise req.error

    def _build(self, le: LayerExperts, req: _ExpertRequest) -> dict[int, Weights]:
        group = req.group
        if group is None:
            return {}
        out: dict[int, Weights] = {}
        for e in req.chunk:
            w: Weights = {}
            for p in le.params:
                if p.fused is not None:
                    w[p.attr] = [weight_view(group[_row_key(p.fused, e)].array[0], p.convert)]
                else:
                    w[p.attr] = [weight_view(group[n].array, p.convert) for n in p.parts[e]]
            out[e] = w
        return out

    def _guess(self, le: LayerExperts, hidden: torch.Tensor) -> None:
        """Apply the routers of the next MoE layers to ``hidden``; prefetch their picks."""
        for nxt in self._ahead.get(le.layer, ()):
            router = self._layout.layers[nxt].router
            if router is None:
                continue
            got = router(hidden)
            idx = got[-1] if isinstance(got, tuple) else None
            if not isinstance(idx, torch.Tensor) or idx.is_floating_point():
                continue
            guess = set(idx.reshape(-1).tolist())
            self._local.guesses[nxt] = guess
            self._count(guessed=len(guess))
            self._post(self._on_guess, nxt, sorted(guess))

    def _post(self, fn: Any, *args: Any) -> None:
        self._loop.call_soon_threadsafe(fn, *args)

    # ------------------------------------------------------------------ loop side

    def _on_request(self, run: ForwardRun, req: _ExpertRequest, first: bool) -> None:
        if run.cancelled or self._pager.closed:
            req.error = ForwardCancelled() if run.cancelled else PagerClosed("the pager is closed")
            req.done.set()
            return
        layer = req.layer
        if first:
            self._policy.touch(layer, req.wanted)
        uncached = []
        for e in req.wanted:
            entry = self._cache.get((layer, e))
            if entry is not None:
                entry.users += 1
                req.lent[e] = entry.weights
            else:
                uncached.append(e)
        per = self._charge[layer]
        n = max(1, self.plan.request_bytes // max(1, per))
        req.chunk, req.rest = uncached[:n], uncached[n:]
        nbytes = self._layout.layers[layer].expert_nbytes
        self._count(hits=len(req.lent), fetched=len(req.chunk), fbytes=nbytes * len(req.chunk))
        if not req.chunk:
            req.done.set()
            return
        task = self._loop.create_task(
            self._acquire(self._layout.layers[layer], req.chunk),
            name=f"asyncpager:torch:experts{layer}",
        )
        req.task = task
        run.tasks.add(task)
        task.add_done_callback(functools.partial(self._hooks.granted, run, req))

    async def _acquire(self, le: LayerExperts, experts: list[int]) -> LeaseGroup:
        if not any(p.fused is not None for p in le.params):
            return await self._pager.acquire_many(n for e in experts for n in le.names(e))
        keys = [(p, e) for e in experts for p in le.params]
        tasks: list[asyncio.Future[Lease | LeaseGroup]] = [
            asyncio.ensure_future(_acquire_part(self._pager, p, e)) for p, e in keys
        ]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                if t.done() and not t.cancelled() and t.exception() is None:
                    t.result().release()
                else:
                    t.cancel()
            raise
        group = LeaseGroup()
        for (p, e), t in zip(keys, tasks, strict=True):
            got = t.result()
            if isinstance(got, Lease):
                group[_row_key(p.fused or "", e)] = got
            else:
                group.update(got)
        return group

    def _on_done(self, req: _ExpertRequest, built: dict[int, Weights]) -> None:
        layer = req.layer
        for e in req.lent:
            entry = self._cache.get((layer, e))
            if entry is not None:
                entry.users -= 1
                if entry.evict and entry.users == 0:
                    self._drop((layer, e))
        req.lent.clear()
        group, req.group = req.group, None
        if group is None:
            return
        le = self._layout.layers[layer]
        charge = self._charge[layer]
        # a concurrent forward may have cached the same expert meanwhile: keep one
        candidates = {(layer, e): charge for e in built if (layer, e) not in self._cache}
        cached = {key: c.nbytes for key, c in self._cache.items() if not c.evict}
        evictable = [key for key, c in self._cache.items() if c.users == 0 and not c.evict]
        keep, drop = (
            self._policy.admit(candidates, cached, evictable)
            if candidates and not self._pager.closed
            else ([], [])
        )
        for key in drop:
            self._drop(key)
        for key in keep:
            e = key[1]
            names = _lease_names(le, e)
            mine = LeaseGroup((n, group.pop(n)) for n in names)
            self._cache[key] = _Cached(mine, built.pop(e), charge)
        built.clear()
        group.release()

    def _drop(self, key: Key) -> None:
        entry = self._cache[key]
        if entry.users:
            entry.evict = True
            return
        del self._cache[key]
        entry.weights = {}
        entry.group.release()

    def _on_guess(self, layer: int, experts: list[int]) -> None:
        if self._pager.closed:
            return
        le = self._layout.layers[layer]
        names = [n for e in experts if (layer, e) not in self._cache for n in le.names(e)]
        if names:
            self._pager.prefetch(names)


async def _acquire_part(pager: Pager, p: ExpertParam, e: int) -> Lease | LeaseGroup:
    """Expert ``e``'s part of parameter ``p``: its rows of a fused tensor, or its
    per-expert tensors."""
    if p.fused is not None:
        return await pager.acquire_rows(p.fused, [e])
    return await pager.acquire_many(p.parts[e])


def _row_key(name: str, expert: int) -> str:
    return f"{name}#{expert}"


def _lease_names(le: LayerExperts, e: int) -> list[str]:
    out: list[str] = []
    for p in le.params:
        out.extend([_row_key(p.fused, e)] if p.fused is not None else p.parts[e])
    return out


def expert_charge(pager: Pager, le: LayerExperts) -> int:
    """Budget charge of one expert of ``le`` (its largest, per-expert tensors)."""
    total = 0
    for p in le.params:
        if p.fused is not None:
            info = pager.tensors[p.fused]
            total += block_capacity(info.offset, info.nbytes // max(1, le.num_experts))
        else:
            total += max(sum(pager.charge_of(n) for n in part) for part in p.parts)
    return total


def plan_experts(
    pager: Pager,
    skeleton: Skeleton,
    paged: Iterable[str],
    *,
    forwards: int,
    depth: int,
    cache_fraction: float,
) -> ExpertBudget:
    """The budget plan of a MoE LM (``plan_expert_budget`` over its largest layer).

    Raises:
        ValueError: ``cache_fraction`` is not within [0, 1].
        BudgetExceeded: one decoder layer and one expert do not fit.
    """
    if not 0.0 <= cache_fraction <= 1.0:
        raise ValueError(f"expert_cache must be a fraction in [0, 1], not {cache_fraction}")
    layout = skeleton.experts
    assert layout is not None
    skip = set(paged)
    pinned = sum(pager.charge_of(n) for n in skeleton.resident_names if n not in skip)
    room = pager.budget_bytes - pinned
    dense = max(sum(pager.charge_of(n) for n in names) for names in skeleton.layer_names.values())
    expert = max(expert_charge(pager, le) for le in layout.layers.values())
    top_k = max(int(getattr(le.router, "top_k", 1) or 1) for le in layout.layers.values())
    n_exp = max(le.num_experts for le in layout.layers.values())
    plan = plan_expert_budget(
        room,
        dense,
        expert,
        top_k,
        n_exp,
        forwards=forwards,
        depth=depth,
        cache_fraction=cache_fraction,
        budget=pager.budget_bytes,
    )
    if plan is None:
        raise BudgetExceeded(
            f"a decoder layer ({dense} bytes without its experts) and one expert "
            f"({expert} bytes) need more than the {room} bytes of the budget of "
            f"{pager.budget_bytes} left after the resident tensors ({pinned} bytes)"
        )
    return plan


def route_experts(model: Any) -> None:
    """Make ``model``'s experts run through the paged backend (registered once)."""
    register_backend()
    model.set_experts_implementation(BACKEND)
