"""Run directories: one writer (lock), nothing changed by a failing command, history kept, broken files handled."""
import csv
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import simmim.pretrain as pretrain
from simmim.train.checkpoint_io import checkpoint_problem, newest_good_checkpoint
from simmim.train.config import ConfigError, load_config
from simmim.train.resume import prepare_run, set_aside_later_checkpoints
from simmim.train.run_dir import (LOCK_NAME, AppendingCSVLogger, acquire_lock, release_lock, save_start_config,
                                  start_run)

HOST = socket.gethostname()


def test_lock_refuses_a_live_run_and_takes_over_a_dead_ones(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(f"{HOST} {other.pid}\n")
        message = (f"{tmp_path} is in use by pid {other.pid} on {HOST} ({tmp_path / LOCK_NAME}); wait until that "
                   f"run ends, pass run_name=NEW for another run, or delete the lock if that process is gone")
        with pytest.raises(ConfigError) as error:
            acquire_lock(tmp_path)
        assert str(error.value) == message
        cfg = load_config("pretrain", overrides=[f"output_dir={tmp_path.parent}", f"run_name={tmp_path.name}"])
        with pytest.raises(ConfigError, match="is in use by pid"):
            prepare_run(cfg)  # refused before the inputs are read
    finally:
        other.kill()
        other.wait()
    with pytest.warns(UserWarning, match=rf"taking over the lock of pid {other.pid} on {HOST}, which is no longer"):
        lock = acquire_lock(tmp_path)
    assert lock.read_text() == f"{HOST} {os.getpid()}\n"
    release_lock(lock)
    assert not lock.exists()

    lock.write_text(f"another-host {os.getpid()}\n")  # a process of another host cannot be checked: refused
    with pytest.raises(ConfigError, match=f"in use by pid {os.getpid()} on another-host"):
        acquire_lock(tmp_path)


def test_other_ranks_neither_check_nor_take_the_lock(tmp_path, monkeypatch):
    lock = acquire_lock(tmp_path)  # rank 0 (this process) holds it; a rank launched beside it runs the same code
    monkeypatch.setenv("LOCAL_RANK", "1")
    cfg = load_config("pretrain", overrides=[f"output_dir={tmp_path.parent}", f"run_name={tmp_path.name}"])
    lock.write_text(f"{HOST} {os.getppid()}\n")  # a live process other than this one
    assert prepare_run(cfg) == (tmp_path, None) and start_run(tmp_path) is None
    assert not list(tmp_path.glob("config*.yaml"))
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="is in use by pid"):
        prepare_run(cfg)


@pytest.mark.timeout(120)
def test_saves_killed_before_their_rename_leave_temporaries_the_next_start_removes(tmp_path):
    """A process killed inside a save of config.yaml, metrics.csv or a checkpoint leaves its temporary file; the
    next start removes each (config.yaml's were named otherwise and stayed for good), the saved files untouched."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.yaml").write_text("kept")
    saves = ["save_config(OmegaConf.create({'seed': 1}), run / 'config.yaml')",
             "_write_csv(str(run / 'metrics.csv'), ['step'], [[1]])",
             "atomic_save({'w': 1}, run / 'checkpoints' / 'last.ckpt')"]
    for save in saves:  # killed at the rename: os.replace ends the process at once, as SIGKILL would
        code = (f"import os, pathlib; from omegaconf import OmegaConf; from simmim.train.config import save_config; "
                f"from simmim.train.run_dir import _write_csv; from simmim.train.checkpoint_io import atomic_save; "
                f"run = pathlib.Path({str(tmp_path)!r}); os.replace = lambda *a: os._exit(9); {save}")
        assert subprocess.run([sys.executable, "-c", code], timeout=100).returncode == 9
    left = sorted(p.name for p in tmp_path.rglob("*.tmp"))
    assert len(left) == 3 and all(name.startswith((".config.yaml.", ".metrics.csv.", ".last.ckpt.")) for name in left)
    with pytest.warns(UserWarning, match="removed 3 temporary files of an interrupted save"):
        release_lock(start_run(tmp_path))
    assert not list(tmp_path.rglob("*.tmp")) and (tmp_path / "config.yaml").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["config.yaml"]


def test_start_run_keeps_every_config_and_removes_stale_temporaries(tmp_path):
    cfg = load_config("pretrain")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".last.ckpt.x1y2ab_9.tmp").write_bytes(b"")  # an interrupted atomic save
    (tmp_path / ".logger_runs.json.4z2mq0ab.tmp").write_bytes(b"")  # an interrupted record of the logger runs
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"keep")
    (tmp_path / "checkpoints" / "mynotes.tmp").write_text("a user's")  # not ours: kept (was deleted)
    (tmp_path / "wandb").mkdir()
    (tmp_path / "wandb" / ".run.abcdefgh.tmp").write_text("wandb's")  # not in our folders: kept
    with pytest.warns(UserWarning, match="removed 2 temporary files of an interrupted save"):
        lock = start_run(tmp_path)
    save_start_config(cfg, tmp_path)
    release_lock(lock)
    cfg.seed = 1
    start_run(tmp_path)
    save_start_config(cfg, tmp_path)
    release_lock(lock)
    copies = sorted(tmp_path.glob("config.*.yaml"))
    assert sorted(p.name for p in tmp_path.rglob("*.tmp")) == [".run.abcdefgh.tmp", "mynotes.tmp"]
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert "seed: 1" in (tmp_path / "config.yaml").read_text()
    assert len(copies) == 2 and "seed: 0" in copies[0].read_text() and "seed: 1" in copies[1].read_text()


def snapshot(folder):
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("bad", ["data.batch_size=-1", "data.source=folder"])
def test_a_failing_command_changes_nothing_in_the_run_directory(tmp_path, bad):
    run = tmp_path / "default"
    (run / "csv").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "csv" / "metrics.csv").write_text("step,train/loss\n0,1.0\n")
    before = snapshot(tmp_path)
    with pytest.raises((ConfigError, FileNotFoundError)):
        pretrain.main([f"output_dir={tmp_path}", bad, f"data.root={tmp_path / 'missing'}"])
    assert snapshot(tmp_path) == before


def test_metrics_csv_is_appended_to(tmp_path):
    first = AppendingCSVLogger(tmp_path, name="csv", version="")
    first.log_metrics({"train/loss": 1.0}, step=0)
    first.save()
    second = AppendingCSVLogger(tmp_path, name="csv", version="")
    second.log_metrics({"train/loss": 0.5}, step=1)
    second.log_metrics({"val/loss": 0.7}, step=1)  # a new column: the header grows, the rows stay
    second.save()
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    assert [(r["step"], r["train/loss"], r["val/loss"]) for r in rows] == [("0", "1.0", ""), ("1", "0.5", ""),
                                                                          ("1", "", "0.7")]


def test_resume_auto_takes_the_highest_step_not_the_newest_file(tmp_path):
    """A copy of a run folder that did not keep modification times (cp -r, rsync without -t) made the copy order
    decide: the run went back to an earlier step checkpoint (or to best.ckpt). The highest step wins; of equal
    steps (last.ckpt beside its step checkpoint), the newest."""
    for name, step, mtime in (("step-00000030.ckpt", 30, 1), ("step-00000010.ckpt", 10, 3), ("best.ckpt", 20, 4),
                              ("last.ckpt", 30, 2)):
        torch.save({"state_dict": {}, "loops": {}, "global_step": step}, tmp_path / name)
        os.utime(tmp_path / name, (mtime, mtime))
    assert newest_good_checkpoint(tmp_path).path == str(tmp_path / "last.ckpt")
    (tmp_path / "last.ckpt").write_bytes(b"cut")  # a bad one newer than the chosen: named
    os.utime(tmp_path / "last.ckpt", (5, 5))
    with pytest.warns(UserWarning, match="last.ckpt cannot be resumed from"):
        assert newest_good_checkpoint(tmp_path).path == str(tmp_path / "step-00000030.ckpt")


def test_a_resume_of_a_checkpoint_of_the_run_reads_it_once(tmp_path, monkeypatch):
    """resume=PATH of a checkpoint in the run's checkpoints/: prepare_run read it, and set_aside_later_checkpoints
    read it again with the run's others (to find the later ones). Each file is now read once; the later ones still
    move aside."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name, step in (("step-00000010.ckpt", 10), ("step-00000020.ckpt", 20), ("last.ckpt", 30)):
        torch.save({"state_dict": {"simmim.encoder.patch_embed.proj.weight": torch.ones(3)}, "loops": {},
                    "global_step": step}, folder / name)
    cfg = load_config("pretrain", overrides=[f"output_dir={tmp_path.parent}", f"run_name={tmp_path.name}",
                                             f"resume={folder / '.' / 'step-00000020.ckpt'}"])
    reads, load = [], torch.load

    def counted(path, *args, **kwargs):
        reads.append(Path(path).name)
        return load(path, *args, **kwargs)
    monkeypatch.setattr(torch, "load", counted)
    run_dir, resume = prepare_run(cfg)
    with pytest.warns(UserWarning, match="last.ckpt of later steps belong to the branch this run leaves"):
        assert set_aside_later_checkpoints(run_dir, resume) == [folder / "last.ckpt"]
    assert sorted(reads) == ["last.ckpt", "step-00000010.ckpt", "step-00000020.ckpt"]


def test_broken_checkpoints_are_named_and_skipped(tmp_path):
    good, newer = tmp_path / "step-00000001.ckpt", tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "loops": {}}, good)
    newer.write_bytes(good.read_bytes()[:100])  # truncated
    os.utime(good, (1, 1))
    assert checkpoint_problem(good) is None and "RuntimeError" in checkpoint_problem(newer)
    torch.save({"model": {}}, tmp_path / "encoder.ckpt")
    os.utime(tmp_path / "encoder.ckpt", (0, 0))
    assert checkpoint_problem(tmp_path / "encoder.ckpt") == "not a Lightning training checkpoint (no state_dict " \
                                                            "or loop state)"
    with pytest.warns(UserWarning, match=f"checkpoint {newer} cannot be resumed from"):
        assert newest_good_checkpoint(tmp_path).path == str(good)

    good.unlink()
    cfg = load_config("pretrain", overrides=[f"output_dir={tmp_path.parent}", f"run_name={tmp_path.name}"])
    (tmp_path / "checkpoints").mkdir()
    for path in (newer, tmp_path / "encoder.ckpt"):
        path.rename(tmp_path / "checkpoints" / path.name)
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match="no checkpoint in .* can be resumed from"):
        prepare_run(cfg)
    cfg.resume = str(tmp_path)  # the run directory, not a checkpoint in it (was an IsADirectoryError traceback)
    with pytest.raises(ConfigError, match=r"cannot be resumed from \(a folder, not a checkpoint file or a DeepSpeed"):
        prepare_run(cfg)
    (tmp_path / "checkpoints" / "step-00000002.ckpt" / "checkpoint").mkdir(parents=True)  # what DeepSpeed saves
    assert checkpoint_problem(tmp_path / "checkpoints" / "step-00000002.ckpt") is None
    cfg.resume = str(tmp_path / "checkpoints" / "last.ckpt")
    with pytest.raises(ConfigError, match=r"resume=.*last.ckpt cannot be resumed from \(RuntimeError"):
        prepare_run(cfg)


@pytest.mark.parametrize("text, reason", [("model: [unclosed\n  x: {", "while parsing a flow sequence"),
                                          ("", "it has no model section"), ("- a list\n", "it has no model section")])
def test_an_unreadable_saved_config_is_one_line_and_left_as_it_is(tmp_path, text, reason):
    """A resume compares the model with the run directory's config.yaml: a broken one (hand-edited, emptied) is
    named with the fix, before anything is written (it used to be a YAML or omegaconf traceback)."""
    cfg = load_config("pretrain", overrides=[f"output_dir={tmp_path.parent}", f"run_name={tmp_path.name}"])
    (tmp_path / "checkpoints").mkdir()
    torch.save({"state_dict": {"simmim.encoder.patch_embed.proj.weight": torch.ones(3)}, "loops": {}},
               tmp_path / "checkpoints" / "last.ckpt")
    (tmp_path / "config.yaml").write_text(text)
    saved = re.escape(str(tmp_path / "config.yaml"))
    with pytest.raises(ConfigError, match=rf"cannot read {saved} \({reason}\).*put back a copy of it "
                                          rf"\(config.<time>.yaml beside it"):
        prepare_run(cfg)
    assert (tmp_path / "config.yaml").read_text() == text
    (tmp_path / "config.yaml").unlink()  # the fix the line names: the resume goes on without that check
    assert prepare_run(cfg)[1].path == str(tmp_path / "checkpoints" / "last.ckpt")


def test_a_finetune_resume_with_another_pretrained_file_is_refused(tmp_path):
    """A resumed fine-tuning run goes on from its own weights: another pretrained= file (it was accepted, and
    config.yaml named it as the run's start) is refused; the same file by another path, or the file moved (its old
    path gone), resumes."""
    for name in ("a.pth", "b.pth"):
        (tmp_path / name).write_bytes(b"weights")
    run = tmp_path / "runs" / "ft"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {"model.patch_embed.proj.weight": torch.ones(3)}, "loops": {}},
               run / "checkpoints" / "last.ckpt")

    def cfg(pretrained):
        return load_config("finetune", overrides=[f"output_dir={run.parent}", "run_name=ft",
                                                  f"pretrained={pretrained}"])
    save_start_config(cfg(tmp_path / "a.pth"), run)
    with pytest.raises(ConfigError, match=rf"cannot resume .*last.ckpt: it was fine-tuned from pretrained="
                                          rf"{tmp_path / 'a.pth'}, this run names {tmp_path / 'b.pth'}; a resumed run "
                                          rf"goes on from its own weights: pass pretrained={tmp_path / 'a.pth'}, or "
                                          rf"run_name=NEW"):
        prepare_run(cfg(tmp_path / "b.pth"))
    with pytest.raises(ConfigError, match="it was fine-tuned from pretrained=.*a.pth, this run names None"):
        prepare_run(cfg("null"))
    assert prepare_run(cfg(tmp_path / "." / "a.pth"))[1].path == str(run / "checkpoints" / "last.ckpt")
    (tmp_path / "a.pth").rename(tmp_path / "moved.pth")
    assert prepare_run(cfg(tmp_path / "moved.pth"))[1].path == str(run / "checkpoints" / "last.ckpt")
