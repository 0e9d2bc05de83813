"""scripts/gpu_check.py on the CPU: a tiny model under the strategies that need no GPU, on a Python where the
packages the GPU machine lacks (albumentations, scikit-learn, jsonargparse) cannot be imported."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import simmim.tools.gpu_check as gpu_check
from conftest import assert_kept_beside
from simmim.train.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
TINY_CPU = ["device=cpu", "precision=32-true", "model.variant=null", "model.img_size=64", "model.window_size=4",
            "model.embed_dim=16", "model.depths=[1,1,1,1]", "model.num_heads=[1,1,1,1]", "steps=3", "warmup=1",
            "batch_size=4"]
# Runs the script as __main__ with those packages missing as on the GPU machine: a None in sys.modules makes
# `import` fail and importlib.util.find_spec return None.
WITHOUT_MISSING_PACKAGES = """
import runpy, sys
sys.modules.update(dict.fromkeys(["albumentations", "sklearn", "jsonargparse"]))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_cpu_run_writes_the_table_without_the_data_packages(tmp_path):
    out = tmp_path / "table.json"
    result = subprocess.run([sys.executable, "-c", WITHOUT_MISSING_PACKAGES, str(SCRIPT), *TINY_CPU,
                             "strategies=single,ddp_zero1", f"out={out}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["strategy"] for row in rows] == ["single", "ddp_zero1"]
    for row in rows:
        assert row["error"] is None
        assert row["images_per_s"] > 0 and math.isfinite(row["loss"])
        assert row["peak_memory_gib"] is None  # CPU
    assert "ddp_zero1" in result.stdout and "images/s" in result.stdout


def test_missing_deepspeed_is_skipped_with_the_install_line(capsys, tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "deepspeed" else real_find_spec(name, *args))
    gpu_check.main([*TINY_CPU, "strategies=deepspeed_stage_2", f"out={tmp_path / 'table.json'}"])
    assert "deepspeed_stage_2: skipped, DeepSpeed is not installed (pip install 'swinv2-simmim[deepspeed]')" \
        in capsys.readouterr().out
    assert json.loads((tmp_path / "table.json").read_text())["rows"] == []

    # a rerun keeps the earlier table under a dated name
    earlier, written = (tmp_path / "table.json").read_bytes(), (tmp_path / "table.json").stat().st_mtime
    gpu_check.main([*TINY_CPU, "strategies=deepspeed_stage_3", f"out={tmp_path / 'table.json'}"])
    assert_kept_beside(tmp_path / "table.json", earlier, written)
    assert capsys.readouterr().err.startswith("kept the earlier table.json as ")


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown strategy 'fsdp3'.*fsdp_grad_op"):
        gpu_check.main([*TINY_CPU, "strategies=single,fsdp3"])
    with pytest.raises(ValueError, match="no timed step"):
        gpu_check.main([*TINY_CPU, "steps=1", "warmup=1"])
    with pytest.raises(ConfigError, match="unknown key 'step'"):
        gpu_check.main(["step=3"])
    with pytest.raises(ConfigError, match="^compile=maybe: expected true, false or auto$"):  # was: every strategy
        gpu_check.main([*TINY_CPU, "compile=maybe"])                                        # failing in the table
    with pytest.raises(ConfigError, match="^steps=abc: expected an integer, as the default 20$"):
        gpu_check.main([*TINY_CPU, "steps=abc"])


def test_an_out_folder_is_one_line_before_the_runs(tmp_path, monkeypatch):
    """out= a folder: refused before the strategies run (it was moved aside as an earlier result after them)."""
    monkeypatch.setattr(gpu_check, "run_strategy", lambda *args: pytest.fail("a strategy ran"))
    with pytest.raises(ConfigError, match=r"^out=.* is a folder; pass the path of a .json file to write"):
        gpu_check.main([*TINY_CPU, "strategies=single", f"out={tmp_path}"])
    assert tmp_path.is_dir()


def test_a_mask_patch_size_the_model_cannot_take_is_one_line_before_the_runs(monkeypatch):
    """mask_patch_size= is checked against the model's img_size and patch_size before any strategy builds it (it
    was the mask generator's ValueError in its own names, "input_size 64 is not divisible by mask_patch_size 24",
    in every strategy's row of the table)."""
    monkeypatch.setattr(gpu_check, "run_strategy", lambda *args: pytest.fail("a strategy ran"))
    for size, patch in (("24", 4), ("2", 4), ("4", 8)):
        with pytest.raises(ConfigError, match=rf"^mask_patch_size={size}: expected a divisor of the model's img_size "
                                              rf"64 that is a multiple of its patch_size {patch}, one of "
                                              rf"{', '.join(str(n) for n in range(patch, 65) if 64 % n == 0)}$"):
            gpu_check.main([*TINY_CPU, "strategies=single", f"mask_patch_size={size}", f"model.patch_size={patch}"])
