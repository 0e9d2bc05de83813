"""scripts/benchmark.py on a tiny model: every configuration runs, the JSON has its numbers, and the savers save."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_kept_beside, run_script
from simmim.tools.peers import available_peers

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny", "embed_dim=16", "depths=[2,2]", "num_heads=[1,2]", "img_size=64", "window_size=4",
        "batch_size=4", "steps=1", "warmup=1"]


def _benchmark(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_benchmark_writes_every_configuration(tmp_path):
    out = tmp_path / "bench.json"
    configs = ["reference", "fast", "fast_ckpt", "fast_ckpt_seq", "fast_bf16"]
    run = _benchmark(*TINY, f"configs=[{','.join(configs)}]", "sequential_attn_chunk=2", f"out={out}")
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    rows = {r["config"]: r for r in report["results"]}
    assert list(rows) == configs
    assert report["gflops_per_image"] > 0
    for row in rows.values():
        assert row["images_per_s"] > 0 and row["peak_memory_mb"] > 0 and 0 < row["mfu"] < 1
        assert row["tflops"] == pytest.approx(report["gflops_per_image"] * row["images_per_s"] / 1e3, rel=1e-6)
    # Checkpointing keeps block inputs only (at this size the attention matrices are too small for sequential
    # attention to matter; the 512 px comparison is in the README).
    for saver in ("fast_ckpt", "fast_ckpt_seq"):
        assert rows[saver]["peak_memory_mb"] < 0.8 * rows["fast"]["peak_memory_mb"]
    assert "reference" in run.stdout.splitlines()[-len(configs) - 2]


@pytest.mark.timeout(120)
def test_a_rerun_keeps_the_earlier_report(tmp_path):
    out = tmp_path / "bench.json"
    args = (*TINY, "configs=[fast]", "device=cpu", f"out={out}")
    assert run_script("simmim.tools.benchmark", *args).returncode == 0
    earlier, written = out.read_bytes(), out.stat().st_mtime
    run = run_script("simmim.tools.benchmark", *args)
    assert run.returncode == 0 and run.stdout.endswith(f"wrote {out}\n"), run.stderr
    assert_kept_beside(out, earlier, written)
    assert run.stderr.startswith("kept the earlier bench.json as ")


def test_benchmark_rejects_unknown_configuration(tmp_path):
    run = run_script("simmim.tools.benchmark", *TINY, "configs=[fastest]", f"out={tmp_path / 'x.json'}")
    assert run.returncode != 0
    assert "unknown config 'fastest'" in run.stderr and "reference" in run.stderr


def test_benchmark_refuses_what_cannot_be_compared(tmp_path):
    out = f"out={tmp_path / 'x.json'}"
    run = run_script("simmim.tools.benchmark", *TINY, "configs=[fast]", "peers=true", out)
    assert run.returncode != 0 and "norm_target=null" in run.stderr  # peers train against raw pixels
    if not torch.cuda.is_available():
        run = run_script("simmim.tools.benchmark", *TINY, "configs=[fast,compiled_flex_bf16]", out)
        assert run.returncode != 0 and "['compiled_flex_bf16'] need CUDA" in run.stderr
    run = run_script("simmim.tools.benchmark", *TINY, "configs=[fast]", "timer=gpu", out)
    assert run.returncode != 0 and "timer='gpu'" in run.stderr
    for arg, message in (("steps=0", "steps=0: expected an integer >= 1"),  # were IndexError, RuntimeError
                         ("batch_size=0", "batch_size=0: expected an integer >= 1"),  # tracebacks
                         ("threads=-1", "threads=-1: expected an integer >= 0"),
                         ("norm_target=4", "norm_target=4: expected an odd window"),
                         (f"out={tmp_path}", f"out={tmp_path} is a folder")):
        run = run_script("simmim.tools.benchmark", *TINY, "configs=[fast]", out, arg)
        assert run.returncode == 1 and run.stderr.startswith(f"error: {message}") and run.stderr.count("\n") == 1


def test_benchmark_times_cpu_seconds(tmp_path):
    out = tmp_path / "bench.json"
    run = _benchmark(*TINY, "configs=[fast]", "timer=cpu", "threads=1", "device=cpu", f"out={out}")
    assert run.returncode == 0, run.stderr
    assert "1 threads, CPU seconds of this process" in run.stdout
    row = json.loads(out.read_text())["results"][0]
    assert row["images_per_s"] > 0 and len(row["step_ms_all"]) == 1


@pytest.mark.skipif(not available_peers(), reason="neither timm nor transformers is installed (optional)")
def test_benchmark_runs_the_peers_interleaved_with_ours(tmp_path):
    out = tmp_path / "bench.json"
    run = _benchmark(*TINY, "configs=[fast]", "norm_target=null", "peers=true", f"out={out}")
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert [r["config"] for r in report["results"]] == ["fast", *available_peers()]
    assert all(len(r["step_ms_all"]) == 1 and r["images_per_s"] > 0 for r in report["results"])
    rate = {r["config"]: r["images_per_s"] for r in report["results"]}
    assert report["versus_peers"]["fast"] == pytest.approx(rate["fast"] / max(rate[p] for p in available_peers()))
