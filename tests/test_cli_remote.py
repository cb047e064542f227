"""The ``asyncpager`` command on URLs: inspect, bench and profile read a model from a
loopback HTTP server (and S3 through moto with --storage-option), bench keeps chunks in
--cache-dir so a second run fetches no data; errors are one line."""

from __future__ import annotations

import json
from pathlib import Path

from asyncpager.tools.synth import write_synthetic_gguf
from tests.support.cli import FAST, assert_one_line_error, run_cli
from tests.support.remote_servers import MotoS3, RangeServer

LAYERS = 4


def _serve(server: RangeServer) -> str:
    write_synthetic_gguf(server.root / "tiny.gguf", n_layers=LAYERS, layer_bytes=64 << 10, width=64)
    return f"{server.url}/tiny.gguf"


def test_inspect_url(range_server: RangeServer, tmp_path: Path) -> None:
    url = _serve(range_server)
    proc = run_cli("inspect", url, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    described = json.loads(proc.stdout)
    assert described["path"] == url
    assert len(described["layers"]) == LAYERS


def test_inspect_s3_with_storage_options(moto_s3: MotoS3, tmp_path: Path) -> None:
    path = write_synthetic_gguf(tmp_path / "tiny.gguf", n_layers=LAYERS, layer_bytes=64 << 10)
    url = moto_s3.upload(path, f"{tmp_path.name}/tiny.gguf")
    options = [f"--storage-option={k}={v}" for k, v in moto_s3.storage_options.items()]
    proc = run_cli("inspect", url, *options, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert url in proc.stdout
    assert moto_s3.secret not in proc.stdout + proc.stderr


def test_bench_url_with_cache_dir(range_server: RangeServer, tmp_path: Path) -> None:
    url = _serve(range_server)
    cache = tmp_path / "cache"
    args = ("bench", url, *FAST, "--budget", "60%", "--cache-dir", cache, "--json")
    first = run_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["model"] == url
    assert list(cache.rglob("*.chunk"))
    data_gets = len(range_server.gets())
    range_server.log.clear()
    second = run_cli(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    # the second run's open only HEADs (bench opens twice: to size its budget, to run)
    assert data_gets > 0
    assert range_server.gets() == []


def test_profile_url(range_server: RangeServer, tmp_path: Path) -> None:
    url = _serve(range_server)
    trace = tmp_path / "trace.json"
    proc = run_cli("profile", url, *FAST, "--trace", trace, "--no-plot", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(trace.read_text())


def test_cache_dir_for_a_local_file_is_a_usage_error(tmp_path: Path) -> None:
    path = write_synthetic_gguf(tmp_path / "tiny.gguf", n_layers=LAYERS, layer_bytes=64 << 10)
    proc = run_cli("bench", path, *FAST, "--cache-dir", tmp_path / "c", cwd=tmp_path)
    assert "apply to URLs" in assert_one_line_error(proc, 2)


def test_missing_object_is_one_line(range_server: RangeServer, tmp_path: Path) -> None:
    proc = run_cli("inspect", f"{range_server.url}/absent.gguf", cwd=tmp_path)
    assert "no such object" in assert_one_line_error(proc, 1)
