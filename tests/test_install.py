"""After a non-editable install, the recipes come with the package: a run from another directory finds them."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_non_editable_install_runs_pretraining_from_another_directory(tmp_path):
    source = tmp_path / "source"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).exists() or (ROOT / name).is_symlink():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, source / name, follow_symlinks=False)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(source)], check=True, capture_output=True, timeout=300)
    for name in ("simmim", "finetune", "masking", "recipes"):  # only the installed copy is left to import
        shutil.rmtree(source / name)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import simmim, finetune; print(simmim.__file__, finetune.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout
    assert where.count(str(site)) == 2, where

    result = subprocess.run(
        [sys.executable, str(source / "scripts" / "pretrain.py"), "recipe=tiny", "print_config=true"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "variant: tiny" in result.stdout, result.stderr[-2000:]
    result = subprocess.run(
        [sys.executable, str(source / "scripts" / "pretrain.py"), "trainer.max_steps=2", "trainer.limit_val_batches=1",
         "data.batch_size=8", "data.num_workers=0", "logging.recon_every_n_steps=0", "trainer.enable_progress_bar=false"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (elsewhere / "runs" / "pretrain" / "default" / "encoder.pth").is_file()
