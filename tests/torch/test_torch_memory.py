"""The whole process's memory for a ``PagedCausalLM``: the synthetic Llama checkpoint
(deterministic, token-exact against transformers), ``lm.memory()`` against its
formula, and ``budget_bytes="auto"`` read from fake cgroup files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.support.cgroups import v1_root

torch = pytest.importorskip("torch")
from asyncpager._memory import (  # noqa: E402
    MemoryLimitExceeded,
    default_margin,
    read_limit,
    read_process_memory,
)
from asyncpager.testing import LLAMA_TINY, synthetic_llama, write_llama_checkpoint  # noqa: E402
from asyncpager.torch import PagedCausalLM  # noqa: E402
from asyncpager.torch._memory import overhead_bytes  # noqa: E402

MiB = 1 << 20
PROMPT = "the model reads a page of memory"
NEW = 6


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_llama(LLAMA_TINY, seed=5, cache=tmp_path_factory.mktemp("cache"))


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def test_synthetic_llama_is_deterministic_from_its_seed(tiny_llama: Path, tmp_path: Path) -> None:
    same = write_llama_checkpoint(tmp_path / "same", LLAMA_TINY, seed=5)
    other = write_llama_checkpoint(tmp_path / "other", LLAMA_TINY, seed=6)
    assert _digest(same) == _digest(tiny_llama)
    assert _digest(other) != _digest(tiny_llama)
    total = sum(f.stat().st_size for f in tiny_llama.glob("*.safetensors"))
    assert LLAMA_TINY.nbytes <= total < LLAMA_TINY.nbytes + 64 * 1024  # headers only
    # cached: a second call returns the same directory without writing
    assert synthetic_llama(LLAMA_TINY, seed=5, cache=tiny_llama.parent) == tiny_llama


def test_synthetic_llama_tokenizer_is_word_level(tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ids = tok(PROMPT).input_ids
    assert len(ids) == len(PROMPT.split())
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == PROMPT
    assert len(tok) == LLAMA_TINY.vocab


async def test_paged_synthetic_llama_matches_transformers(tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_llama)(PROMPT).input_ids
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False)
    want = out[0, len(ids) :].tolist()
    async with PagedCausalLM.open(tiny_llama, budget_bytes=LLAMA_TINY.nbytes // 2) as lm:
        assert lm.pager.budget_bytes < LLAMA_TINY.nbytes
        got = await lm.generate(ids, NEW, stop=())
    assert got == want


async def test_memory_record_follows_the_formula(tiny_llama: Path) -> None:
    async with PagedCausalLM.open(tiny_llama, budget_bytes=LLAMA_TINY.nbytes // 2) as lm:
        before = lm.memory()
        assert before.resident_bytes == lm.pager.resident_bytes  # the pinned norm
        assert before.resident_bytes <= before.pager_bytes <= before.budget_bytes
        ids = lm.tokenizer(PROMPT).input_ids
        await lm.generate(ids, NEW, stop=())
        r = lm.memory()
        assert r.budget_bytes == lm.pager.budget_bytes == LLAMA_TINY.nbytes // 2
        assert r.resident_bytes == lm.pager.resident_bytes > before.resident_bytes
        assert r.pager_bytes <= r.budget_bytes
        assert r.runtime_bytes == before.runtime_bytes > 0
        assert r.kv_bytes_per_token == LLAMA_TINY.kv_bytes_per_token()
        assert r.overhead_allowance_bytes == overhead_bytes(
            lm.config,
            lm.index,
            lm._skeleton,
            lm.dtype,
            max_concurrent_forwards=2,
            paged_ends=True,
        )
        assert r.anon_bytes <= r.bound_bytes(len(ids) + NEW)
        assert r.bound_bytes(10) - r.bound_bytes(0) == 10 * r.kv_bytes_per_token
        assert r.auto is None
        assert lm.budget_choice is None


async def test_auto_budget_from_a_cgroup_limit(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the process's code pages count against a cgroup too: how many depends on what this
    # test process has imported, so the fake limit leaves 600 MiB beside them
    code_pages = -(-read_process_memory().file_bytes // MiB) * MiB
    limit = 900 * MiB + code_pages
    root = v1_root(tmp_path, limit=limit, rss=300 * MiB)
    monkeypatch.setenv("ASYNCPAGER_PROC_ROOT", str(root))
    async with PagedCausalLM.open(tiny_llama, budget_bytes="auto") as lm:
        choice = lm.budget_choice
        assert choice is not None
        # the allowance plus the process's code pages (file-backed, charged to the cgroup)
        code = choice.overhead_bytes - lm.memory().overhead_allowance_bytes
        assert 0 < code < code_pages + (64 << 20)  # RssFile moves a little as code runs
        want = limit - 301 * MiB - choice.overhead_bytes - default_margin(limit)
        assert choice.budget_bytes == lm.pager.budget_bytes == want
        assert choice.limit == read_limit(root)
        assert lm.memory().limit_bytes == limit
        assert lm.memory().limit_hits == 0
        (root / "sys/fs/cgroup/memory/jobs/job1/memory.failcnt").write_text("17\n")
        assert lm.memory().limit_hits == 17  # read at each call
        assert await lm.generate(lm.tokenizer(PROMPT).input_ids, 2, stop=())


async def test_auto_budget_refused_when_nothing_fits(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "ASYNCPAGER_PROC_ROOT", str(v1_root(tmp_path, limit=400 * MiB, rss=350 * MiB))
    )
    with pytest.raises(MemoryLimitExceeded, match="no budget fits under the memory limit"):
        await PagedCausalLM.open(tiny_llama, budget_bytes="auto")


async def test_explicit_budget_over_the_limit_refused_at_open(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "ASYNCPAGER_PROC_ROOT", str(v1_root(tmp_path, limit=600 * MiB, rss=300 * MiB))
    )
    with pytest.raises(MemoryLimitExceeded, match="does not fit under the memory limit of 600 MiB"):
        await PagedCausalLM.open(tiny_llama, budget_bytes="400MiB")


def test_direct_io_preferred_only_when_auto_filled_a_cgroup_limit() -> None:
    from pathlib import Path as P

    from asyncpager._memory import MemoryLimit, choose_budget
    from asyncpager.torch._lm import _MemoryBasis

    cgroup = choose_budget(MemoryLimit("cgroup1", 2 << 30, 1 << 30, "fake"), 100 * MiB)
    machine = choose_budget(MemoryLimit("meminfo", 2 << 30, 1 << 30, "fake"), 100 * MiB)
    budget = cgroup.budget_bytes

    def basis(auto: object) -> _MemoryBasis:
        return _MemoryBasis(0, 100 * MiB, 0, auto, budget)  # type: ignore[arg-type]

    assert basis(cgroup).prefers_direct_io(P("/m"), budget + 1)
    assert not basis(cgroup).prefers_direct_io(P("/m"), budget)  # the model fits
    assert not basis(cgroup).prefers_direct_io("s3://b/m", budget + 1)  # remote
    assert not basis(machine).prefers_direct_io(P("/m"), budget + 1)
    assert not basis(None).prefers_direct_io(P("/m"), budget + 1)
