"""A run directory that keeps its history: one writer at a time, every start's config, metrics appended.

`<run dir>/run.lock` names the host and pid of the process that writes the directory (rank 0 of a run). A second
run is refused while that process lives; a lock left by a dead process on this host is taken over with a warning.
Nothing is written before the caller has validated the config and the inputs (`start_run` comes after both); a
start is recorded (`save_start_config`) once the checkpoint it resumes has been restored.
"""
from __future__ import annotations

import atexit
import csv
import os
import socket
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig
from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from simmim.train.checkpoint_io import TEMPORARY_NAME, written_atomically
from simmim.train.config import ConfigError, save_config

LOCK_NAME = "run.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _read_lock(lock: Path) -> tuple[str, int] | None:
    """(host, pid) of a lock file; None when it is gone or unreadable (half-written)."""
    try:
        host, pid = lock.read_text().split()
        return host, int(pid)
    except (FileNotFoundError, ValueError):
        return None


def launch_rank() -> int:
    """This process's rank before a Trainer exists, from the launchers' variables (torchrun, SLURM, MPI, Lightning's
    own launcher: LOCAL_RANK and NODE_RANK); 0 when none is set."""
    for name in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "JSM_NAMESPACE_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    local = int(os.environ.get("LOCAL_RANK", 0))
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0)))
    return 0 if local == node == 0 else max(local, 1)


def check_unlocked(run_dir: Path) -> None:
    """Raise ConfigError when a live process holds run_dir's lock (read-only: call it before validating inputs).
    Ranks other than 0 do not check: their rank 0 holds the lock."""
    if launch_rank() != 0:
        return
    owner = _read_lock(Path(run_dir) / LOCK_NAME)
    if owner is None:
        return
    host, pid = owner
    if host == socket.gethostname() and (pid == os.getpid() or not _alive(pid)):
        return  # this process's own lock (a second run in one process), or stale: taken over by acquire_lock
    raise ConfigError(f"{run_dir} is in use by pid {pid} on {host} ({Path(run_dir) / LOCK_NAME}); wait until that "
                      f"run ends, pass run_name=NEW for another run, or delete the lock if that process is gone")


def acquire_lock(run_dir: Path) -> Path:
    """Create `<run_dir>/run.lock` holding "host pid", removed when this process exits normally. A lock of a
    dead process on this host is taken over with a warning; a live one (or one of another host) is a ConfigError."""
    lock = Path(run_dir) / LOCK_NAME
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = f"{socket.gethostname()} {os.getpid()}\n"
    for _ in range(3):  # a takeover race with another starting run is retried
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            check_unlocked(run_dir)  # raises unless the owner is dead or this process
            owner = _read_lock(lock)
            if owner == (socket.gethostname(), os.getpid()):
                return lock
            if owner is None:
                time.sleep(0.1)  # being written by another starting run, or removed: look again
                if _read_lock(lock) is None:
                    lock.unlink(missing_ok=True)
                continue
            warnings.warn(f"{lock}: taking over the lock of pid {owner[1]} on {owner[0]}, which is no longer "
                          f"running (killed or crashed)", stacklevel=2)
            stale = lock.with_name(f"{LOCK_NAME}.{os.getpid()}.stale")
            os.replace(lock, stale)  # only one of several racing runs gets to remove it
            stale.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        atexit.register(release_lock, lock)
        return lock
    raise ConfigError(f"could not take {lock}; another run is starting in {run_dir}: pass run_name=NEW")


def release_lock(lock: Path) -> None:
    """Remove the lock if this process holds it."""
    owner = _read_lock(lock)
    if owner == (socket.gethostname(), os.getpid()):
        lock.unlink(missing_ok=True)


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporary files an interrupted save of ours leaves (`TEMPORARY_NAME`) in the run directory and
    its checkpoints/ and csv/ folders; other .tmp files (a user's, wandb's, mlflow's) stay."""
    folders = (Path(run_dir), Path(run_dir) / "checkpoints", Path(run_dir) / "csv")
    stale = [p for folder in folders for p in folder.glob("*.tmp") if p.is_file() and TEMPORARY_NAME.fullmatch(p.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        warnings.warn(f"removed {len(stale)} temporary files of an interrupted save in {run_dir} "
                      f"(first: {stale[0].name})", stacklevel=2)
    return stale


def utc_stamp(seconds: float | None = None) -> str:
    """A time as it goes into the names of kept files (config.<UTC time>.yaml): 2026-11-28T18-40-50.123456Z; the
    time now, or `seconds` since the epoch (a file's st_mtime)."""
    when = datetime.now(timezone.utc) if seconds is None else datetime.fromtimestamp(seconds, timezone.utc)
    return when.strftime("%Y-%m-%dT%H-%M-%S.%fZ")


def start_run(run_dir: Path) -> Path | None:
    """Take over the run directory once the config and the inputs are valid: on rank 0 take the lock and remove
    stale temporary files. Returns the lock (None on other ranks)."""
    if launch_rank() != 0:
        return None
    run_dir = Path(run_dir)
    lock = acquire_lock(run_dir)
    remove_stale_temporaries(run_dir)
    return lock


def save_start_config(cfg: DictConfig, run_dir: Path) -> None:
    """The resolved config of this start as config.yaml and a dated copy `config.<UTC time>.yaml` beside it (every
    start is kept)."""
    save_config(cfg, Path(run_dir) / f"config.{utc_stamp()}.yaml")
    save_config(cfg, Path(run_dir) / "config.yaml")


def _write_csv(path: str, header: list[str], rows: list) -> None:
    """Write a CSV file (header, then rows: lists or dicts) to a temporary file and rename it into place."""
    with written_atomically(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([row.get(key, "") for key in header] if isinstance(row, dict) else row for row in rows)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer without the deletion of an existing metrics.csv: new rows are appended (the header
    grows when new metrics appear; the file is then rewritten, atomically). `rows`: the rows in the file."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self.rows = 0
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                reader = csv.reader(f)
                self.metrics_keys = next(reader, [])
                self.rows = sum(1 for _ in reader)

    def _check_log_dir_exists(self) -> None:
        pass

    def save(self) -> None:
        written = len(self.metrics)
        super().save()
        self.rows += written

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        _write_csv(self.metrics_file_path, fieldnames, rows)

    def rewind(self, rows: int, step: int) -> None:
        """Drop the rows after the first `rows` that log a step >= `step` (after a resume, the run logs them
        again); later rows of earlier steps stay (Lightning logs a step's metrics after that step's checkpoint)."""
        if rows >= self.rows:
            return
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader)
            column = header.index("step")
            kept = [row for i, row in enumerate(reader) if i < rows or int(row[column]) < step]
        _write_csv(self.metrics_file_path, header, kept)
        self.rows = len(kept)


class AppendingCSVLogger(CSVLogger):
    """A CSVLogger whose `metrics.csv` keeps the rows of earlier (killed, finished or resumed) runs. `saved_rows`
    and `rewind` let a resumed run drop the rows that a crashed run logged after its checkpoint (see
    `simmim.train.resume.ExactResume`). Rank 0 only."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    @property
    def metrics_file(self) -> str:
        """The absolute path of metrics.csv."""
        return os.path.realpath(self.experiment.metrics_file_path)

    def saved_rows(self) -> int:
        """The rows of metrics.csv once the buffered ones are written."""
        self.experiment.save()
        return self.experiment.rows

    def rewind(self, rows: int, step: int) -> None:
        """`_AppendingWriter.rewind`."""
        self.experiment.rewind(rows, step)
