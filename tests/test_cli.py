"""The `packkv` command run as a user runs it: a subprocess, its exit code and output."""

import json
import subprocess
import sys

import pytest
import torch


def packkv(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "packkv.cli", *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc, *words):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("packkv")]
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_help_lists_subcommands():
    proc = packkv("--help")
    assert proc.returncode == 0
    for name in ("demo", "study", "compress", "inspect", "bench"):
        assert name in proc.stdout


def test_demo_json_on_a_tiny_setting():
    proc = packkv("demo", "--json", "--prompt-tokens", "200", "--new-tokens", "4", "--ppl-windows", "1",
                  "--ppl-tokens", "256", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    for key in ("kv", "compressed_blocks", "fp16", "packkv", "top1_agreement", "config", "model"):
        assert key in result
    for name in ("fp16", "packkv"):
        assert result[name]["ppl"] > 1 and result[name]["tokens_per_s"] > 0 and len(result[name]["ids"]) == 4
    blocks = result["compressed_blocks"]
    assert 0 < blocks["k_bytes"] < blocks["k_fp16_bytes"] and 0 < blocks["v_bytes"] < blocks["v_fp16_bytes"]
    # The last generated token is never fed back, so it never reaches the cache.
    assert result["kv"]["tokens"] == 200 + 4 - 1 and result["kv"]["stored_bytes"] > 0
    assert 0.5 < result["top1_agreement"] <= 1.0


def test_compress_then_inspect_verify(tmp_path):
    out = tmp_path / "cache.pkv"
    proc = packkv("compress", "--tokens", "130", "--out", str(out), "--repack", "median")
    assert proc.returncode == 0, proc.stderr
    assert out.exists() and "30 layers" in proc.stdout
    proc = packkv("inspect", str(out), "--verify")
    assert proc.returncode == 0, proc.stderr
    assert "verified" in proc.stdout and "smollm2" in proc.stdout
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 0x10
    bad = tmp_path / "flipped.pkv"
    bad.write_bytes(bytes(data))
    assert_one_line_error(packkv("inspect", str(bad), "--verify"), "inspect")


@pytest.mark.parametrize("args, words", [
    (("compress", "--model", "no-such-model", "--tokens", "8", "--out", "x"), ("unknown model", "smollm2")),
    (("compress", "--tokens", "8", "--out", "x", "--k-rel", "5"), ("k_rel",)),
    (("compress", "--tokens", "8", "--out", "x", "--text", "/no/such/file.txt"), ("/no/such/file.txt",)),
    (("inspect", "/no/such/file.pkv"), ("/no/such/file.pkv",)),
])
def test_user_errors_are_one_line(args, words):
    assert_one_line_error(packkv(*args), *words)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_bench_without_gpu_says_so():
    assert_one_line_error(packkv("bench"), "GPU")
