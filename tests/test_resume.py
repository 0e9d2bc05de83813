"""kill -9 in the middle of an epoch, resume=auto: the run ends with the weights, the grad-scaler state, the k-NN
history and the metrics.csv rows of a run that was never killed (digits and shards sources, 0 and 2 workers).
SIGTERM (a scheduler's time limit or preemption): the run saves the step it ends on and continues from it."""
import contextlib
import csv
import math
import os
import signal
import shutil
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins import MixedPrecision
from torch.utils.data import DataLoader

from conftest import jpeg
import simmim.train.trainer
from simmim import pretrain as pretrain_stage
from simmim.tools import make_shards
from simmim.train.checkpoint_io import newest_good_checkpoint
from simmim.train.resume import ExactResume
from simmim.train.run_dir import AppendingCSVLogger

ROOT = Path(__file__).resolve().parents[1]
# 4 batches of 8 per epoch, 10 steps: epochs end at steps 4 and 8; step checkpoints at 3, 6 and 9 (mid-epoch 0,
# mid-epoch 1, mid-epoch 2). Drop path draws from the global generator; validation runs every epoch; the k-NN monitor
# measures before training, after every epoch and after the last step (steps 0, 4, 8 and 10).
ARGS = ["data.img_size=32", "data.batch_size=8", "model.embed_dim=16", "model.num_heads=[2,2,4,8]",
        "model.drop_path_rate=0.1", "trainer.max_steps=10", "trainer.max_epochs=-1", "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
        "logging.recon_every_n_steps=0", "checkpoint.every_n_steps=3", "checkpoint.keep_last=2",
        "eval.knn_every_n_epochs=1", "eval.knn_max_images=64"]


# the fine-tune: from scratch, Mixup / CutMix and drop path from the global generators, RandAugment in the
# workers, random erasing on the device
FINETUNE = ["pretrained=null", "data.img_size=32", "model.window_size=4", "data.batch_size=8", "model.embed_dim=16",
            "data.randaug_ops=2", "data.random_erasing=0.5",
            "model.num_heads=[2,2,4,8]", "trainer.max_steps=10", "trainer.max_epochs=-1",
            "trainer.limit_train_batches=4", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=1", "checkpoint.every_n_steps=3", "checkpoint.keep_last=2"]


def pretrain(run_dir: Path, workers: int, wait: bool = True, script: str = "pretrain", args: list = ARGS):
    """Run the script to its end (the result), or start it in a session of its own (the Popen; its stderr goes to
    <run_dir>.stderr beside the run directory)."""
    command = [sys.executable, str(ROOT / "scripts" / f"{script}.py"), f"output_dir={run_dir.parent}",
               f"run_name={run_dir.name}", f"data.num_workers={workers}", *args]
    env = {**os.environ, "PYTHONWARNINGS": "always"}
    if not wait:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{run_dir}.stderr", "w") as stderr:
            return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env, start_new_session=True)
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def encoder(run_dir: Path) -> dict:
    return torch.load(run_dir / "encoder.pth", weights_only=False)["model"]


def wait_for(process: subprocess.Popen, path: Path, timeout: float = 240) -> None:
    start = time.monotonic()
    while not path.exists():
        assert process.poll() is None, "the run ended before it could be stopped"
        assert time.monotonic() - start < timeout, f"{path} did not appear"
        time.sleep(0.02)


def kill_after(process: subprocess.Popen, path: Path, timeout: float = 240) -> None:
    """SIGKILL the process as soon as `path` exists."""
    wait_for(process, path, timeout)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


def files(folder: Path) -> dict:
    """Every file under `folder` with its bytes and modification time."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def metrics(run_dir: Path) -> list[dict]:
    return list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))


def logged(rows: list[dict]) -> list[tuple]:
    """(step, names of the metrics logged) of every row of metrics.csv, sorted: what was logged, once each."""
    return sorted((int(row["step"]), tuple(k for k, v in row.items() if v and k != "step")) for row in rows)


def assert_logged_once(rows: list[dict], whole_rows: list[dict], checkpoint_step: int) -> None:
    """Every metric of every step at most once, as the uninterrupted run logged it; only the row of step
    checkpoint_step - 1 may be missing: Lightning writes it just after the step checkpoint, and these tests kill the
    run as soon as that checkpoint appears (a known window: a kill between the two loses that row)."""
    got, expected = logged(rows), logged(whole_rows)
    assert len(set(got)) == len(got) and set(got) <= set(expected)
    assert {step for step, _ in set(expected) - set(got)} <= {checkpoint_step - 1}


def knn_points(rows: list[dict]) -> list[float]:
    """step, top-1, step, top-1, ... of the k-NN rows of metrics.csv."""
    return [float(row[key]) for row in rows if row["knn/top1"] for key in ("step", "knn/top1")]


def knn_history(run_dir: Path) -> list[dict]:
    """The k-NN monitor's history (the points of knn.png) in the checkpoint written after the last step."""
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]["KNNMonitor"]["history"]


def numbers(history: list[dict]) -> list[float]:
    return [math.nan if row[key] is None else row[key] for row in history
            for key in ("epoch", "train_loss", "val_loss", "knn_top1")]


def knn_line(result) -> str:
    """The k-NN points the run printed at its end ("k-NN top-1 (val) by epoch: 0: 0.812, ...")."""
    line = next(line for line in result.stdout.splitlines() if line.startswith("k-NN top-1 (val) by epoch"))
    return line.split("; plot: ")[0]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("whole") / "run"
    return run, pretrain(run, workers=0)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("workers, kill_at, broken, resumed_step", [
    (0, "step-00000003.ckpt", (), 3), (2, "step-00000006.ckpt", ("best", "last", "step-00000006"), 3),
    (0, "last.ckpt", (), 4), (2, "last.ckpt", (), 4)])
def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path, workers, kill_at, broken, resumed_step,
                                                         uninterrupted):
    """The same weights with 0 and 2 workers (data randomness depends on (seed, epoch, index) only), the same k-NN
    history and the same metrics.csv rows, each once. Killed at step 3 (mid-epoch 0); at step 6 (mid-epoch 1) with
    the checkpoints after step 3 truncated (step 6; best and last at step 4), so the run resumes from step 3 and
    repeats what it had logged from there (the k-NN point of epoch 1 included); at last.ckpt, just after the k-NN
    point of epoch 1 was logged (Lightning repeats the end of that epoch when it resumes there)."""
    run = tmp_path / "killed"
    kill_after(pretrain(run, workers, wait=False), run / "checkpoints" / kill_at)
    checkpoints = sorted((run / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    assert not (run / "encoder.pth").exists() and (run / "run.lock").exists()
    broken = [run / "checkpoints" / f"{name}.ckpt" for name in broken]
    for path in broken:  # truncated (a crash of the disk, not of the save): the next newest good one is used
        path.write_bytes(path.read_bytes()[:1000])
    rows_before = metrics(run)
    key = "encoder.layers.0.blocks.0.mlp.fc1.weight"
    first = torch.load(checkpoints[0], weights_only=False)["state_dict"][f"simmim.{key}"]
    if kill_at == "step-00000006.ckpt":  # moved before the resume (rsync to another disk): the rows it logged
        run = run.rename(tmp_path / "moved")  # after step 3 were kept, then logged again (found by absolute path)
        broken = [run / "checkpoints" / path.name for path in broken]

    resumed = pretrain(run, workers)
    assert "taking over the lock of pid" in resumed.stderr
    assert "not resumable" not in resumed.stderr  # the DataModule restores its place: no warning that it does not
    for path in broken:
        assert f"checkpoint {path} cannot be resumed from" in resumed.stderr
    weights = encoder(run)
    for name, value in encoder(uninterrupted[0]).items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=1e-6, msg=name)
    assert (weights[key] - first).abs().max() > 1e-4  # the resumed part of the run did train

    assert knn_line(resumed) == knn_line(uninterrupted[1])
    history, whole_history = knn_history(run), knn_history(uninterrupted[0])
    assert [row["epoch"] for row in history] == [0, 1, 2, 3]  # the points of knn.png: losses and k-NN top-1
    assert numbers(history) == pytest.approx(numbers(whole_history), rel=1e-5, nan_ok=True)
    rows, whole_rows = metrics(run), metrics(uninterrupted[0])
    assert_logged_once(rows, whole_rows, resumed_step)
    assert knn_points(rows) == pytest.approx(knn_points(whole_rows), abs=1e-6)
    kept = [{**{k: "" for k in rows[0]}, **row} for row in rows_before if int(row["step"]) < resumed_step]
    assert rows[:len(kept)] == kept  # the rows before the checkpoint are those written before the kill
    assert len(list(run.glob("config.*.yaml"))) == 2 and not (run / "run.lock").exists()
    steps = sorted(p.name for p in (run / "checkpoints").glob("step-*.ckpt"))
    assert steps == ["step-00000006.ckpt", "step-00000009.ckpt"]  # keep_last=2


def group_ended(session: int, timeout: float = 30) -> bool:
    """Whether every process of the session (a run and its DataLoader workers) is gone within timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            os.killpg(session, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


# As the recipes bound a run: by epochs (12 steps; epochs end at 4, 8 and 12), and by epochs and steps (10). The lr
# schedule's length then comes from the train loader's (`trainer.estimated_stepping_batches`).
EPOCHS = {"epochs": [*ARGS, "trainer.max_steps=-1", "trainer.max_epochs=3"],
          "epochs and steps": [*ARGS, "trainer.max_steps=10", "trainer.max_epochs=3"]}


@pytest.fixture(scope="module")
def uninterrupted_by(tmp_path_factory):
    """The uninterrupted run of each bound of EPOCHS (run directory, result), made when first asked for."""
    runs = {}

    def run(bound):
        if bound not in runs:
            run_dir = tmp_path_factory.mktemp("whole") / "run"
            runs[bound] = run_dir, pretrain(run_dir, workers=0, args=EPOCHS[bound])
        return runs[bound]
    return run


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("bound, workers, kill_at, resumed_step, last_step", [
    ("epochs", 2, "step-00000006.ckpt", 6, 12), ("epochs and steps", 0, "last.ckpt", 4, 10)])
def test_killed_epoch_bounded_run_resumes_to_the_uninterrupted_weights(tmp_path, bound, workers, kill_at,
                                                                       resumed_step, last_step, uninterrupted_by):
    """A run bounded by epochs killed mid-epoch 1, and one bounded by epochs and steps killed at the end of epoch
    0, end on the uninterrupted run's weights, k-NN points and metrics rows. (The lr schedule used to ask for the
    run's length in configure_optimizers: Lightning then set up the train loader and started it, in epoch 0's
    order, before the checkpoint was restored, and kept that iterator for the resumed epoch. With max_steps set
    too, Lightning ends the epoch of an end-of-epoch checkpoint again when it resumes there and counted it twice:
    the run stopped at step 8.)"""
    whole, whole_result = uninterrupted_by(bound)
    run = tmp_path / "killed"
    kill_after(pretrain(run, workers, wait=False, args=EPOCHS[bound]), run / "checkpoints" / kill_at)
    resumed = pretrain(run, workers, args=EPOCHS[bound])
    assert f"Restored all states from the checkpoint at {run / 'checkpoints' / kill_at}" in resumed.stderr
    weights = encoder(run)
    for name, value in encoder(whole).items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=1e-6, msg=name)
    assert knn_line(resumed) == knn_line(whole_result)
    rows = metrics(run)
    assert_logged_once(rows, metrics(whole), resumed_step)
    assert max(int(row["step"]) for row in rows) == last_step


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_to_the_whole_job_saves_its_step_and_resumes_to_the_uninterrupted_weights(tmp_path, uninterrupted):
    """SIGTERM to every process of the run mid-epoch, the DataLoader workers included, as SLURM sends it at a time
    limit or a preemption: the run ends after the step under way with status 143 and one line (before, a worker's
    death raised in the middle of a backward and nothing was saved), saves that step as sigterm-<step>.ckpt and
    leaves no process behind; the same command continues it to the weights, k-NN points and metrics.csv rows of
    the run that was never stopped."""
    run = tmp_path / "stopped"
    process = pretrain(run, 2, wait=False)
    wait_for(process, run / "checkpoints" / "step-00000006.ckpt")
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    stderr = Path(f"{run}.stderr").read_text()
    saved = list((run / "checkpoints").glob("sigterm-*.ckpt"))
    assert len(saved) == 1, stderr[-3000:]
    step = torch.load(saved[0], weights_only=False)["global_step"]
    assert step in (6, 7)  # the step under way when the signal came (or the next): mid-epoch 1 (steps 5 to 8)
    assert f"stopped by SIGTERM after step {step}: saved {saved[0]}" in stderr
    assert "Traceback" not in stderr and "killed by signal" not in stderr
    assert group_ended(process.pid) and not (run / "run.lock").exists()

    resumed = pretrain(run, 2)
    weights = encoder(run)
    for name, value in encoder(uninterrupted[0]).items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=1e-6, msg=name)
    assert knn_line(resumed) == knn_line(uninterrupted[1])
    rows, whole_rows = metrics(run), metrics(uninterrupted[0])
    assert logged(rows) == logged(whole_rows)  # every row once, none lost
    assert knn_points(rows) == pytest.approx(knn_points(whole_rows), abs=1e-6)


def children(pid: int) -> list[int]:
    """The pids of the processes whose parent is pid (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_to_one_of_two_ranks_stops_both_after_the_same_step(tmp_path):
    """Two DDP ranks on CPU (gloo; Lightning starts rank 1 as a child process of rank 0) and SIGTERM to rank 1
    alone, as when one node of a multi-node job is stopped: the ranks agree before the next step, save the last
    one together and both end with status 143 (rank 1 stopping alone made rank 0 fail: tried); the resumed run
    ends with the weights and metrics of the 2-rank run never stopped."""
    args = [*ARGS, "trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu"]
    pretrain(tmp_path / "whole", 0, args=args)
    run = tmp_path / "stopped"
    process = pretrain(run, 0, wait=False, args=args)
    try:
        wait_for(process, run / "checkpoints" / "step-00000003.ckpt")
        (rank_1,) = children(process.pid)  # data.num_workers=0: rank 1 is rank 0's only child
        os.kill(rank_1, signal.SIGTERM)
        assert process.wait(timeout=120) == 128 + signal.SIGTERM
        assert group_ended(process.pid)  # rank 1 ended too
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    saved = list((run / "checkpoints").glob("sigterm-*.ckpt"))
    assert len(saved) == 1 and "Traceback" not in Path(f"{run}.stderr").read_text()
    pretrain(run, 0, args=args)
    weights = encoder(run)
    for name, value in encoder(tmp_path / "whole").items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=1e-6, msg=name)
    assert logged(metrics(run)) == logged(metrics(tmp_path / "whole"))


RECIPE_CALLBACKS = simmim.train.trainer.build_callbacks


def pretrain_in_process(monkeypatch, args: list[str], *callbacks: pl.Callback) -> None:
    """scripts/pretrain.py's main(args) in this process, warnings silenced, with `callbacks` after the recipe's."""
    monkeypatch.setattr(simmim.train.trainer, "build_callbacks", lambda cfg: [*RECIPE_CALLBACKS(cfg), *callbacks])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pretrain_stage.main(args)


class SigtermAt(pl.Callback):
    """Sends this process SIGTERM once, at the first validation batch after `step` (not the sanity check)."""

    def __init__(self, step: int):
        self.step, self.sent = step, False

    def on_validation_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step and not trainer.sanity_checking and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_during_validation_stops_at_the_end_of_the_epoch(tmp_path, monkeypatch):
    """SIGTERM in the first of 2 validation batches at the end of epoch 0 (Lightning alone would stop there,
    mid-validation, and the resumed run would never log that validation): the epoch ends (validation, last.ckpt,
    k-NN point), its last step is saved as sigterm-00000004.ckpt before the next batch, the exit status is 143,
    and the resumed run ends with the weights and every metrics.csv row of the run that was never stopped."""
    args = [f"output_dir={tmp_path}", *ARGS, "trainer.limit_val_batches=2", "data.num_workers=0"]

    def run(name, sigterm_step=None):
        pretrain_in_process(monkeypatch, [f"run_name={name}", *args],
                            *([SigtermAt(sigterm_step)] if sigterm_step else []))

    run("whole")
    with pytest.raises(SystemExit) as stopped:
        run("stopped", sigterm_step=4)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert sorted(p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir()) == [
        "best.ckpt", "last.ckpt", "sigterm-00000004.ckpt", "step-00000003.ckpt"]
    run("stopped")
    weights = encoder(tmp_path / "stopped")
    for name, value in encoder(tmp_path / "whole").items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=1e-6, msg=name)
    assert logged(metrics(tmp_path / "stopped")) == logged(metrics(tmp_path / "whole"))


class SignalAt(pl.Callback):
    """Sends this process `signum` `times` times (Ctrl-C pressed that often) once optimizer step `step` is done."""

    def __init__(self, step: int, times: int, signum: int = signal.SIGINT):
        self.step, self.times, self.signum, self.sent = step, times, signum, False

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)
                time.sleep(0.05)  # handled before the next: Python runs one handler call for signals that pile up


@pytest.mark.timeout(300)
def test_ctrl_c_saves_its_step_and_a_second_one_stops_at_once(tmp_path, monkeypatch, capfd):
    """Ctrl-C after step 6 (mid-epoch 1): the step is saved as sigint-00000006.ckpt, the exit status is 130, SIGINT
    is handled as before once training ends, and the resumed run ends with the weights and metrics.csv rows of the
    run never stopped. Ctrl-C twice: Lightning's shutdown at once (status 1), nothing saved; the same command
    continues from the latest step checkpoint and ends the same. A run started with SIGINT ignored (a shell script's
    background job) leaves it ignored: Ctrl-C twice changes nothing and the run ends normally."""
    args = [f"output_dir={tmp_path}", *ARGS, "data.num_workers=0"]

    def run(name, times=0):
        pretrain_in_process(monkeypatch, [f"run_name={name}", *args], *([SignalAt(6, times)] if times else []))

    found = signal.getsignal(signal.SIGINT)  # SIG_IGN where pytest runs as a background job (`pytest &`)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # so does a run started that way: Ctrl-C is not for it
    try:
        run("ignored", times=2)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, found)
    assert not list((tmp_path / "ignored" / "checkpoints").glob("sigint-*.ckpt"))
    assert "Ctrl-C" not in capfd.readouterr().err
    run("whole")
    # (Lightning runs checkpoint callbacks last: the second Ctrl-C stops before step-00000006.ckpt is written.)
    for times, status, saved in ((1, 128 + signal.SIGINT, ["sigint-00000006.ckpt", "step-00000006.ckpt"]), (2, 1, [])):
        name = f"ctrl-c-{times}"
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as a script started from a terminal
        try:
            with pytest.raises(SystemExit) as stopped:
                run(name, times)
            handler = signal.getsignal(signal.SIGINT)
        finally:
            signal.signal(signal.SIGINT, found)
        assert stopped.value.code == status
        assert handler is signal.default_int_handler  # not ours, nor Lightning's SIG_IGN of its shutdown
        assert sorted(p.name for p in (tmp_path / name / "checkpoints").iterdir()) == sorted(
            ["best.ckpt", "last.ckpt", "step-00000003.ckpt", *saved])
        err = capfd.readouterr().err
        assert ("stopped by Ctrl-C (SIGINT) after step 6: saved" in err) == (times == 1)
        assert "Ctrl-C: stopping after this step and saving it; Ctrl-C again stops at once" in err
        run(name)
        weights = encoder(tmp_path / name)
        for key, value in encoder(tmp_path / "whole").items():
            torch.testing.assert_close(weights[key], value, rtol=0, atol=1e-6, msg=key)
        assert logged(metrics(tmp_path / name)) == logged(metrics(tmp_path / "whole"))


@pytest.mark.timeout(300)
def test_sigusr1_in_a_slurm_job_saves_its_step_and_requeues_the_job(tmp_path, monkeypatch, capfd, slurm_job):
    """SIGUSR1 after step 6 (mid-epoch 1) in a SLURM job, SLURM's requeue signal in Lightning's convention
    (`#SBATCH --signal=USR1@...`): the step is saved as sigusr1-00000006.ckpt (and no hpc_ckpt_*.ckpt, which Lightning
    would save from inside its own handler), the job requeued once by `scontrol requeue 4242`, the exit status is 138,
    SIGUSR1's handler is put back; the job's next start ends with the weights and metrics.csv rows of the run never
    stopped. When scontrol refuses (a job not requeueable), one line says so and what to do."""
    args = [f"output_dir={tmp_path}", *ARGS, "data.num_workers=0"]

    def run(name, stop=False):
        pretrain_in_process(monkeypatch, [f"run_name={name}", *args],
                            *([SignalAt(6, 1, signal.SIGUSR1)] if stop else []))

    run("whole")
    for name, scontrol_status in (("requeued", 0), ("refused", 1)):
        monkeypatch.setenv("SCONTROL_STATUS", str(scontrol_status))
        with pytest.raises(SystemExit) as stopped:
            run(name, stop=True)
        assert stopped.value.code == 128 + signal.SIGUSR1
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
        assert sorted(p.name for p in (tmp_path / name).rglob("*.ckpt")) == [
            "best.ckpt", "last.ckpt", "sigusr1-00000006.ckpt", "step-00000003.ckpt", "step-00000006.ckpt"]
        err = capfd.readouterr().err
        assert f"stopped by SIGUSR1 after step 6: saved {tmp_path / name / 'checkpoints'}/sigusr1-00000006.ckpt" in err
        assert ("requeued SLURM job 4242: its next start continues the run" in err) == (scontrol_status == 0)
        assert ("could not requeue SLURM job 4242 (scontrol requeue: scontrol: error: Batch job 4242 is not "
                "requeueable); submit the job again to continue the run" in err) == (scontrol_status == 1)
    assert slurm_job.read_text() == "requeue 4242\n" * 2  # once a run

    run("requeued")
    weights = encoder(tmp_path / "requeued")
    for key, value in encoder(tmp_path / "whole").items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=1e-6, msg=key)
    assert logged(metrics(tmp_path / "requeued")) == logged(metrics(tmp_path / "whole"))


@pytest.mark.timeout(300)
def test_a_mid_epoch_resume_with_other_images_per_batch_is_refused(tmp_path):
    """A checkpoint from the middle of an epoch continues that epoch's order only with the same images per batch
    over all ranks (a 2-rank run of 2 x 8 resumed on 1 device of 16 ends on its weights: checked by hand); another
    data.batch_size is refused with the fixes, while a resume from the end of an epoch takes any."""
    args = [f"output_dir={tmp_path}", "run_name=run", *ARGS, "data.num_workers=0", "trainer.max_steps=-1",
            "trainer.max_epochs=2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pretrain_stage.main(args)  # 8 steps; step-00000006.ckpt: 2 of epoch 1's 4 batches done
        ckpts = tmp_path / "run" / "checkpoints"
        before = files(tmp_path / "run")
        with pytest.raises(ValueError, match=rf"{ckpts / 'step-00000006.ckpt'} was saved in the middle of an epoch "
                                             rf"by 1 rank\(s\) x data.batch_size=8, this run has 1 x 4: the epoch "
                                             rf"continues only with 8 images per batch over all ranks; .* or resume "
                                             rf"from the end of an epoch \(resume={ckpts / 'last.ckpt'}"):
            pretrain_stage.main([*args, f"resume={ckpts / 'step-00000006.ckpt'}", "data.batch_size=4",
                                 "trainer.max_epochs=3"])
        assert files(tmp_path / "run") == before  # no config.yaml of the refused start, no empty log files
        pretrain_stage.main([*args, f"resume={ckpts / 'last.ckpt'}", "data.batch_size=4", "trainer.max_epochs=3"])
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 8 + 4  # epoch 2: 4 batches of 4


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_finetune_resumes_to_the_uninterrupted_weights(tmp_path):
    def final(run):
        return torch.load(run / "checkpoints" / "step-00000009.ckpt", weights_only=False)["state_dict"]

    pretrain(tmp_path / "whole", 0, script="finetune", args=FINETUNE)
    run = tmp_path / "killed"
    kill_after(pretrain(run, 0, wait=False, script="finetune", args=FINETUNE),
               run / "checkpoints" / "step-00000003.ckpt")
    pretrain(run, 0, script="finetune", args=FINETUNE)
    whole, resumed = final(tmp_path / "whole"), final(run)
    for name, value in whole.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """data.* arguments of WebDataset shards that make_shards packed from a folder: 4 training shards of about 18
    images (2 classes) and 1 validation shard."""
    root = tmp_path_factory.mktemp("shards")
    for split, count in (("train", 72), ("val", 8)):
        for i in range(count):
            path = root / "src" / split / f"class{i % 2}" / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpeg(i + 1000 * (split == "val"), (40, 40, 3)))
    size_mb = sum(p.stat().st_size for p in (root / "src" / "train").rglob("*.jpg")) / 4 / 1e6
    make_shards.main([f"root={root / 'src'}", f"out={root}", f"shard_mb={size_mb:.6f}", "workers=2"])
    assert len(list((root / "train").glob("*.tar"))) >= 4  # 2 workers: each reads 2 shards
    return ["data.source=shards", f"data.shards={root / 'train'}", f"data.val_shards={root / 'val'}",
            "data.shuffle_buffer=8", "eval.knn_every_n_epochs=0"]  # the k-NN monitor embeds listed images only


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers, kill_after_step", [(0, 3), (2, 6)])
def test_killed_run_on_shards_resumes_to_the_uninterrupted_weights(tmp_path, shards, workers, kill_after_step):
    """The streamed source: killed at a mid-epoch step checkpoint, resumed from the place in the shards it saved.
    (The data order depends on the number of workers, so each has its own uninterrupted run.)"""
    args = [*ARGS, *shards]
    pretrain(tmp_path / "whole", workers, args=args)
    run = tmp_path / "killed"
    kill_after(pretrain(run, workers, wait=False, args=args), run / "checkpoints" / f"step-{kill_after_step:08d}.ckpt")
    assert not (run / "encoder.pth").exists()
    state = torch.load(run / "checkpoints" / f"step-{kill_after_step:08d}.ckpt", weights_only=False)
    assert state["SimMIMDataModule"]["shards"]["ranks"][0]["batches"] == kill_after_step % 4  # mid-epoch
    assert "not resumable" not in pretrain(run, workers, args=args).stderr  # the shard position is restored
    weights, whole = encoder(run), encoder(tmp_path / "whole")
    for name, value in whole.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=1e-6, msg=name)
    assert_logged_once(metrics(run), metrics(tmp_path / "whole"), kill_after_step)


def cpu_fp16_trainer(**kwargs) -> pl.Trainer:
    """A Trainer for trainer.precision=16-mixed on the CPU (where Lightning would switch to bf16-mixed): fp16 autocast
    and a CPU GradScaler that doubles its scale every 2 steps without overflow and halves it on overflow."""
    assert kwargs.pop("precision") == "16-mixed"
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, growth_interval=2)
    plugins = [*kwargs.pop("plugins"), MixedPrecision("16-mixed", "cpu", scaler)]
    return pl.Trainer(**kwargs, plugins=plugins)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resume_restores_the_grad_scaler(tmp_path, monkeypatch):
    """fp16 mixed precision: the step checkpoints hold the grad scaler's state and a run resumed mid-epoch from one
    has, at every later checkpoint, the scale and growth tracker of the run that was never interrupted. (A
    checkpoint on disk is what kill -9 leaves: saves are atomic and the run is deterministic.)"""
    monkeypatch.setattr(simmim.train.trainer, "pl", types.SimpleNamespace(Trainer=cpu_fp16_trainer))
    args = [*ARGS, "checkpoint.keep_last=5", "trainer.precision=16-mixed", "trainer.accelerator=cpu",
            "data.num_workers=0"]

    def run(name):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pretrain_stage.main([f"output_dir={tmp_path}", f"run_name={name}", *args])
        checkpoints = {p.name: torch.load(p, weights_only=False) for p in (tmp_path / name / "checkpoints").glob("*")}
        return {name: c["MixedPrecision"] for name, c in checkpoints.items()}, encoder(tmp_path / name)

    whole, whole_weights = run("whole")
    scale = {name: state["scale"] for name, state in whole.items()}
    assert 2.0 ** 16 < scale["step-00000003.ckpt"] < scale["step-00000006.ckpt"]  # grown
    assert whole["step-00000003.ckpt"]["_growth_tracker"] == 1
    assert scale["last.ckpt"] < scale["step-00000009.ckpt"]  # step 10 overflowed: halved

    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "whole" / "checkpoints" / "step-00000003.ckpt", tmp_path / "resumed" / "checkpoints")
    resumed, resumed_weights = run("resumed")
    assert sorted(resumed) == sorted(whole) == ["best.ckpt", "last.ckpt", *(f"step-{s:08d}.ckpt" for s in (3, 6, 9))]
    for name, state in resumed.items():
        assert state == whole[name], name
    for name, value in whole_weights.items():
        torch.testing.assert_close(resumed_weights[name], value, rtol=0, atol=1e-6, msg=name)


class Mean(pl.LightningModule):
    """One weight fitted to the mean of the numbers 0..7, one per step; logs its loss every step."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        loss = (self.weight - batch.mean()) ** 2
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val", (self.weight - batch.mean()) ** 2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_resume_drops_the_csv_rows_logged_after_its_checkpoint(tmp_path):
    """A run resumed from the step-2 checkpoint of a run that went on to step 6 (as one killed there would have)
    logs steps 2-5 again: their first rows are dropped, those before stay as they were; validate keeps them all."""
    data = DataLoader(torch.arange(8.0).view(8, 1), batch_size=1)

    def trainer():
        return pl.Trainer(max_steps=6, logger=AppendingCSVLogger(tmp_path, name="csv", version=""),
                          callbacks=[ExactResume(0), ModelCheckpoint(tmp_path / "ckpt", "{step}", every_n_train_steps=2,
                                                                     save_top_k=-1)],
                          log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                          accelerator="cpu")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer().fit(Mean(), data)
        first = metrics(tmp_path)
        assert [int(row["step"]) for row in first] == list(range(6))
        trainer().validate(Mean(), data, ckpt_path=tmp_path / "ckpt" / "step=2.ckpt")
        assert metrics(tmp_path)[:6] == [{**row, "val": ""} for row in first] and len(metrics(tmp_path)) == 7
        trainer().fit(Mean(), data, ckpt_path=tmp_path / "ckpt" / "step=2.ckpt")
    rows = metrics(tmp_path)
    assert [(int(row["step"]), bool(row["loss"])) for row in rows] == [
        (0, True), (1, True), (0, False), (2, True), (3, True), (4, True), (5, True)]  # validate's row: step 0
    assert rows[:2] == [{**row, "val": ""} for row in first[:2]]  # step 1's row was written after the checkpoint


@pytest.mark.timeout(300)
def test_the_checks_before_a_resume_read_each_checkpoint_once(tmp_path, monkeypatch):
    """Before Lightning loads the checkpoint to resume, our checks (which checkpoint is good, its stage and model,
    the settings it was trained with, the mid-epoch layout) read each checkpoint of the run once: the one resumed
    was read three times (its pickle each time: a record of every tensor, the 3B model's optimizer states too)."""
    args = [f"output_dir={tmp_path}", "run_name=r", *ARGS, "data.num_workers=0", "trainer.max_steps=4",
            "eval.knn_every_n_epochs=0"]
    pretrain_in_process(monkeypatch, args)  # leaves step-00000003.ckpt, last.ckpt and best.ckpt
    reads, load = [], torch.load

    def counting_load(f, *args, **kwargs):
        reads.append(str(f))  # Lightning's load passes an open file, ours the path
        return load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    pretrain_in_process(monkeypatch, [*args, "trainer.max_steps=5"])
    ours = [read for read in reads if read.endswith(".ckpt")]
    assert str(tmp_path / "r" / "checkpoints" / "last.ckpt") in ours and len(set(ours)) == len(ours), ours


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_run_resumed_after_a_signal_resumes_again_from_its_step_checkpoints(tmp_path, monkeypatch):
    """A signal checkpoint is saved as the next batch starts, when Lightning has counted that batch as fetched: the
    resumed run carried that count into every later checkpoint, and a run resumed from one of them skipped the
    validation at its epoch's end (found by resuming twice after Ctrl-C). SIGTERM after step 2, the same command,
    then a copy resumed from that run's step-5 checkpoint: metrics.csv as the run never stopped."""
    args = [f"output_dir={tmp_path}", *ARGS, "data.num_workers=0", "checkpoint.every_n_steps=1",
            "checkpoint.keep_last=20"]
    pretrain_in_process(monkeypatch, ["run_name=whole", *args])
    with pytest.raises(SystemExit) as stopped:
        pretrain_in_process(monkeypatch, ["run_name=stopped", *args], SignalAt(2, 1, signal.SIGTERM))
    assert stopped.value.code == 128 + signal.SIGTERM
    pretrain_in_process(monkeypatch, ["run_name=stopped", *args])
    shutil.copytree(tmp_path / "stopped", tmp_path / "again")
    for path in (tmp_path / "again" / "checkpoints").iterdir():  # as if killed after step 5
        if not path.name.startswith("step-") or int(path.stem[5:]) > 5:
            path.unlink()
    pretrain_in_process(monkeypatch, ["run_name=again", *args])
    assert logged(metrics(tmp_path / "again")) == logged(metrics(tmp_path / "whole"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_resume_of_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path, monkeypatch):
    """resume=PATH of an earlier step left the later checkpoints of the branch it leaves in checkpoints/; stopped by
    SIGTERM, the next resume=auto went back to them (the highest step) and dropped the new branch's steps without a
    word (found in a 2-rank run). They move to checkpoints/superseded-<time>/ when the run starts."""
    args = [f"output_dir={tmp_path}", "run_name=r", *ARGS, "data.num_workers=0", "checkpoint.every_n_steps=1",
            "checkpoint.keep_last=20", "trainer.max_steps=6"]
    pretrain_in_process(monkeypatch, args)
    folder = tmp_path / "r" / "checkpoints"
    later = sorted(p.name for p in folder.glob("*.ckpt") if p.name not in ("step-00000001.ckpt", "step-00000002.ckpt"))
    assert {"last.ckpt", "best.ckpt", "step-00000006.ckpt"} <= set(later)
    with pytest.raises(SystemExit):
        pretrain_in_process(monkeypatch, [*args, f"resume={folder / 'step-00000002.ckpt'}"],
                            SignalAt(3, 1, signal.SIGTERM))
    aside = list(folder.glob("superseded-*"))
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == later
    assert newest_good_checkpoint(folder).path == str(folder / "sigterm-00000003.ckpt")
    pretrain_in_process(monkeypatch, args)  # the new branch goes on to its end
    assert int(torch.load(folder / "last.ckpt", weights_only=False)["global_step"]) == 6


@pytest.mark.timeout(300)
def test_an_extended_run_trains_at_its_new_schedule_from_the_first_resumed_step(tmp_path):
    """A finished run of trainer.max_epochs=2 extended to 4 (the same command, resume=auto from last.ckpt) took the
    first step after the resume at the lr its optimizer was saved with: the old schedule's last (min_lr, where the
    new cosine is at 3/4 of its peak), logged as train/lr; the steps after were the new schedule's."""
    args = [f"output_dir={tmp_path}", "run_name=run", *ARGS, "data.num_workers=0", "trainer.max_steps=-1",
            "trainer.limit_train_batches=3", "checkpoint.every_n_steps=0", "eval.knn_every_n_epochs=0",
            "optim.warmup_epochs=1", "optim.schedule=cosine"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pretrain_stage.main([*args, "trainer.max_epochs=2"])  # steps 0-5
        pretrain_stage.main([*args, "trainer.max_epochs=4"])  # steps 6-11, resumed from last.ckpt at step 6
    scale = 8 / 512  # data.batch_size / 512: the recipe's lrs are scaled by the total batch
    peak, warmup, low = 8e-3 * scale, 5e-7 * scale, 5e-6 * scale  # the default recipe's base_lr, warmup_lr, min_lr

    def lr(step: int, total: int) -> float:  # 3 warmup steps (1 epoch), then cosine to min_lr at `total`
        if step < 3:
            return warmup + (peak - warmup) * step / 3
        return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * (step - 3) / (total - 3)))

    logged_lr = {int(row["step"]): float(row["train/lr"]) for row in metrics(tmp_path / "run") if row["train/lr"]}
    assert sorted(logged_lr) == list(range(12))
    expected = {step: lr(step, 6 if step < 6 else 12) for step in range(12)}
    assert logged_lr == pytest.approx(expected, rel=1e-5, abs=1e-12)  # step 6 was min_lr, 1/1200 of its lr


@pytest.mark.timeout(300)
def test_a_run_resumed_with_another_total_batch_trains_at_its_lr(tmp_path):
    """A run of data.batch_size=8 resumed with data.batch_size=16 (resume=auto from last.ckpt, a longer run) kept the
    lrs of the total batch of 8: the checkpoint's optimizer and scheduler states came back over the ones built for 16,
    and the new run peaked at half its lr (optim.base_lr x total batch / 512) without a word. It follows the new
    total batch from the first resumed step, and says so once."""
    args = [f"output_dir={tmp_path}", "run_name=run", *ARGS, "data.num_workers=0", "trainer.max_steps=-1",
            "trainer.limit_train_batches=3", "checkpoint.every_n_steps=0", "eval.knn_every_n_epochs=0",
            "optim.warmup_epochs=1", "optim.schedule=cosine"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pretrain_stage.main([*args, "trainer.max_epochs=1"])  # steps 0-2 at a total batch of 8
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pretrain_stage.main([*args, "data.batch_size=16", "trainer.max_epochs=2"])  # steps 3-5, resumed at step 3

    def lr(step: int, total: int, batch: int) -> float:  # 3 warmup steps (1 epoch), then cosine to min_lr at `total`
        peak, warmup, low = (value * batch / 512 for value in (8e-3, 5e-7, 5e-6))  # the default recipe's lrs, scaled
        if step < 3:
            return warmup + (peak - warmup) * step / 3
        return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * (step - 3) / (total - 3)))

    logged_lr = {int(row["step"]): float(row["train/lr"]) for row in metrics(tmp_path / "run") if row["train/lr"]}
    assert sorted(logged_lr) == list(range(6))
    expected = {step: lr(step, 3, 8) if step < 3 else lr(step, 6, 16) for step in range(6)}
    assert logged_lr == pytest.approx(expected, rel=1e-5, abs=1e-12)
    said = [str(w.message) for w in caught if "total batch is 16" in str(w.message)]
    assert said == ["the total batch is 16 (was 8 when step 3 was saved): the learning rate follows it, peak 2.5e-04 "
                    "(was 1.25e-04; optim.base_lr x total batch / 512)"], said
