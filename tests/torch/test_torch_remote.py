"""PagedCausalLM and ``asyncpager generate`` from a checkpoint in object storage: the
small files (config, tokenizer) are copied to a local directory, the weights paged from
the server under the budget; the tokens equal the fully loaded model's, and with
--cache-dir a second run fetches no weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.cli import run_cli
from tests.support.remote_servers import MotoS3, RangeServer
from tests.support.torch_models import budget_for, reference, save_tiny, save_word_tokenizer

torch = pytest.importorskip("torch")
from asyncpager.torch import PagedCausalLM  # noqa: E402

NEW_TOKENS = 6


@pytest.mark.parametrize("arch", ["llama", "llama-sharded"])
async def test_paged_lm_from_http_is_token_exact(
    range_server: RangeServer, tmp_path: Path, arch: str
) -> None:
    local = save_tiny(arch, tmp_path / arch)
    ref = reference(local, NEW_TOKENS)
    shutil.copytree(local, range_server.root / "ckpt")
    url = f"{range_server.url}/ckpt/"
    budget = budget_for(local, 2)
    async with PagedCausalLM.open(url, budget_bytes=budget, tokenizer=False) as lm:
        assert lm.pager.budget_bytes == budget
        for prompt, expected in ref.greedy.items():
            assert await lm.generate(list(prompt), max_new_tokens=NEW_TOKENS) == expected
        assert lm.pager.stats().bytes_read > 0


async def test_paged_lm_from_s3_with_cache(moto_s3: MotoS3, tmp_path: Path) -> None:
    local = save_tiny("llama", tmp_path / "llama")
    ref = reference(local, NEW_TOKENS)
    prefix = f"{tmp_path.name}/llama"
    for f in sorted(local.iterdir()):
        moto_s3.upload(f, f"{prefix}/{f.name}")
    url = f"s3://{moto_s3.bucket}/{prefix}/"
    cache = tmp_path / "cache"
    options = {"storage_options": moto_s3.storage_options, "cache_dir": cache}
    budget = budget_for(local, 2)
    for _ in range(2):
        async with PagedCausalLM.open(url, budget_bytes=budget, **options) as lm:
            prompt, expected = next(iter(ref.greedy.items()))
            assert await lm.generate(list(prompt), max_new_tokens=NEW_TOKENS) == expected
            fetched = lm.pager.source.stats.fetched_bytes  # type: ignore[attr-defined]
    assert fetched == 0  # the second open read every chunk from the cache
    assert (cache / "files").is_dir()


@pytest.mark.timeout(300)  # a process importing torch on a loaded 2-core machine
def test_generate_cli_from_a_url(range_server: RangeServer, tmp_path: Path) -> None:
    local = save_tiny("llama", tmp_path / "llama")
    save_word_tokenizer(local)
    shutil.copytree(local, range_server.root / "ckpt")
    proc = run_cli(
        "generate", f"{range_server.url}/ckpt", "--budget", budget_for(local, 2),
        "--prompt", "w5 w9 w20", "--max-new-tokens", "4", "--cache-dir", tmp_path / "c",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "tokens/s" in proc.stdout
    assert list((tmp_path / "c").rglob("*.chunk"))
