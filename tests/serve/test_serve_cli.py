"""``asyncpager serve`` as a user starts it: ``--help`` states every default and where
the API key may come from; the key is taken from ``$ASYNCPAGER_API_KEY`` or a file, so
it never shows in the process list; the model may be an object-storage URL (here S3
through moto, with a disk cache); a checkpoint without a chat template answers chat
with a 400 that says so. One event loop: the server is a subprocess."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from pathlib import Path

import aiohttp
import openai
import pytest

from asyncpager.serve._main import api_key
from tests.support.cli import assert_one_line_error, run_cli
from tests.support.remote_servers import MotoS3
from tests.support.serveproc import Served
from tests.support.tinylm import reference_greedy

ONE_LOOP = pytest.mark.asyncio(loop_factories=["asyncio"])  # the server is a subprocess

KEY = "sk-from-elsewhere-7d1e"


def test_help_states_defaults_and_key_sources(tmp_path: Path) -> None:
    proc = run_cli("serve", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for phrase in (
        "(default: 8000)",
        "(default: 127.0.0.1)",
        "(default: 50%)",
        "(default: schedule)",
        "eviction policy",
        "--api-key-file",
        "ASYNCPAGER_API_KEY",
        "--header-timeout",
        "--body-timeout",
        "(default: 60)",
        "--log-level",
        "share of the checkpoint's weights",
        "s3://",
    ):
        assert phrase in text, phrase


def _keys(**given: str | None) -> argparse.Namespace:
    return argparse.Namespace(**{"api_key": None, "api_key_file": None, **given})


def test_the_key_comes_from_the_option_the_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ASYNCPAGER_API_KEY", raising=False)
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    assert api_key(_keys()) is None
    assert api_key(_keys(api_key_file=str(key_file))) == KEY
    monkeypatch.setenv("ASYNCPAGER_API_KEY", "from-env")
    assert api_key(_keys()) == "from-env"
    assert api_key(_keys(api_key="flag")) == "flag"  # the option wins over the variable
    key_file.write_text("\n")
    with pytest.raises(ValueError, match="holds no key"):
        api_key(_keys(api_key_file=str(key_file)))


def test_an_empty_key_file_or_both_options_are_one_line_exit_2(
    tiny_models: Callable[[str], Path], tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.write_text("")
    model = tiny_models("llama")
    line = assert_one_line_error(run_cli("serve", model, "--api-key-file", empty, cwd=tmp_path), 2)
    assert line.startswith("asyncpager serve: error:")
    assert "holds no key" in line
    both = run_cli("serve", model, "--api-key", "k", "--api-key-file", empty, cwd=tmp_path)
    assert "not allowed with" in assert_one_line_error(both, 2)


@ONE_LOOP
async def test_the_key_from_the_environment_guards_the_server(
    tiny_models: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ASYNCPAGER_API_KEY", KEY)
    with Served(tiny_models("llama"), "-q") as server:
        cmdline = await asyncio.to_thread(Path(f"/proc/{server.proc.pid}/cmdline").read_bytes)
        assert KEY.encode() not in cmdline
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{server.url}/v1/models") as r:
                assert r.status == 401
            headers = {"Authorization": f"Bearer {KEY}"}
            async with s.get(f"{server.url}/v1/models", headers=headers) as r:
                assert r.status == 200
        assert server.stop() == 0


@ONE_LOOP
async def test_serve_takes_a_url_and_says_when_chat_has_no_template(
    tiny_models: Callable[[str], Path], moto_s3: MotoS3, tmp_path: Path
) -> None:
    local = tiny_models("llama")
    prefix = f"{tmp_path.name}/llama"
    for file in local.iterdir():
        if file.name != "chat_template.jinja":  # this copy has no chat template
            moto_s3.upload(file, f"{prefix}/{file.name}")
    url = f"s3://{moto_s3.bucket}/{prefix}/"
    options = [f"--storage-option={k}={v}" for k, v in moto_s3.storage_options.items()]
    cache = tmp_path / "cache"
    prompt = [5, 6, 7, 8]
    expected = reference_greedy(local, prompt, 6)
    with Served(url, *options, "--cache-dir", str(cache)) as server:
        async with openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key="x", max_retries=0
        ) as client:
            done = await client.completions.create(
                model="tiny", prompt=prompt, max_tokens=6, temperature=0
            )
            with pytest.raises(openai.BadRequestError) as refused:
                await client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "hi"}]
                )
        assert server.stop() == 0, server.stderr_text
    assert done.usage is not None
    assert done.usage.completion_tokens == len(expected)
    assert done.choices[0].text == _decode(local, expected)
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["code"] == "no_chat_template"
    assert "has no chat template" in error["message"]
    assert any(cache.rglob("*.chunk"))
    assert f"disk cache {cache}" in server.stderr_text  # the ready summary
    assert moto_s3.secret not in server.stderr_text + server.stdout_text


def _decode(path: Path, ids: list[int]) -> str:
    from transformers import AutoTokenizer

    text: str = AutoTokenizer.from_pretrained(path).decode(ids, skip_special_tokens=True)
    return text
