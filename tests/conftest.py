import contextlib
import importlib
import io
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from simmim.models.swinv2 import SwinTransformerV2

TINY = dict(img_size=64, patch_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 8), window_size=4,
            num_classes=10, drop_path_rate=0.0)


def tiny_swinv2(**overrides) -> SwinTransformerV2:
    """A SwinV2 small enough for unit tests (64 px, widths 16-128)."""
    return SwinTransformerV2(**{**TINY, **overrides})


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere: the official init zeroes the post-norms, which hides most bugs."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("logit_scale"):
            p.copy_(torch.log(torch.tensor(10.0)) + 0.3 * noise)
        elif p.dim() == 1 and "norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.2 * noise)
        else:
            p.copy_(0.2 * noise)
    return model


def jpeg(seed: int, shape: tuple = (24, 32, 3)) -> bytes:
    """The JPEG bytes of a random uint8 image of `shape` drawn by `seed`."""
    import cv2  # here: the model tests run where only torch is (scripts/gpu_benchmarks.sh)

    image = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    return cv2.imencode(".jpg", image)[1].tobytes()


def run_script(module: str, *argv: str) -> subprocess.CompletedProcess:
    """`python scripts/<name>.py *argv` in this process: `module`'s main(argv) under simmim.cli.run_cli, as the
    script runs it -> its exit status, stdout and stderr (an exit message goes to stderr with status 1, as Python
    does). For the tests of one-line errors, without a new interpreter's seconds of imports; the scripts
    themselves run in test_install, test_resume and the end-to-end tests."""
    from simmim.cli import run_cli

    out, err, argv_before, status = io.StringIO(), io.StringIO(), sys.argv, 0
    sys.argv = [module, *argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_cli(importlib.import_module(module).main)
    except SystemExit as exit_:
        if isinstance(exit_.code, str):
            print(exit_.code, file=err)
        status = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
    finally:
        sys.argv = argv_before
    return subprocess.CompletedProcess([module, *argv], status, out.getvalue(), err.getvalue())


def assert_kept_beside(path, earlier: bytes, written: float) -> None:
    """A rerun kept `earlier` (path's bytes before it, last written at st_mtime `written`) beside path as
    <stem>.<UTC time written><suffix> (simmim.cli.keeping_earlier), wrote other bytes at path, left no temporary."""
    from simmim.train.run_dir import utc_stamp

    kept = path.with_name(f"{path.stem}.{utc_stamp(written)}{path.suffix}")
    assert kept.read_bytes() == earlier, sorted(p.name for p in path.parent.iterdir())
    assert path.read_bytes() != earlier
    assert not list(path.parent.glob(f".{path.name}.*.tmp"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _signal_handlers():
    """Every test leaves the handlers of the signals training takes (SIGINT, SIGTERM, SIGUSR1) as it found them: a
    run in a process (a notebook, a test) must not change how that process answers Ctrl-C after it."""
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    found = {signum: signal.getsignal(signum) for signum in signals}
    yield
    changed = {signal.Signals(signum).name: signal.getsignal(signum) for signum in signals
               if signal.getsignal(signum) != found[signum]}
    for signum in signals:
        signal.signal(signum, found[signum])
    assert not changed, f"the test left other signal handlers: {changed}"


@pytest.fixture
def slurm_job(tmp_path, monkeypatch):
    """This process as task 0 of SLURM batch job 4242 as srun starts it (its variables), with an `scontrol` on the
    PATH that writes its arguments, one call a line, to the returned file, and answers as `SCONTROL_STATUS` says."""
    calls, tools = tmp_path / "scontrol.calls", tmp_path / "slurm-bin"
    tools.mkdir()
    (tools / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n'
                                    'if [ "${SCONTROL_STATUS:-0}" != 0 ]; then\n'
                                    '  echo "scontrol: error: Batch job 4242 is not requeueable" >&2\n'
                                    '  exit "$SCONTROL_STATUS"\nfi\n')
    (tools / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")
    for name, value in dict(SLURM_JOB_ID="4242", SLURM_JOB_NAME="pretrain", SLURM_NTASKS="1", SLURM_PROCID="0",
                            SLURM_LOCALID="0", SLURM_NODEID="0").items():
        monkeypatch.setenv(name, value)
    return calls
