"""What every script in scripts/ shares: running its command with one-line errors, the `device=` key, refusing
to write over an output that exists or keeping an earlier result aside (refusing any other file there), checking
an output folder and the DataLoader keys."""
from __future__ import annotations

import errno
import importlib
import itertools
import json
import os
import signal
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from lightning_fabric.utilities.exceptions import MisconfigurationException
from lightning_utilities.core.rank_zero import rank_zero_only
from omegaconf import OmegaConf

from simmim.train.checkpoint_io import written_atomically
from simmim.train.config import ConfigError, as_list
from simmim.train.run_dir import launch_rank, utc_stamp


def run(module: str) -> None:
    """The whole body of a script in scripts/: import `module` and run its `main(argv)` on the command line.

    Python puts a script's folder first on the import path, where scripts/finetune.py would hide the `finetune`
    package; the folder is taken off the path before `module` is imported.
    """
    script_dir = Path(sys.argv[0]).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != script_dir]
    run_cli(lambda argv: importlib.import_module(module).main(argv))  # Ctrl-C while importing: one line too


class RequeueSignal(BaseException):
    """SIGUSR1 outside training, where there is no step to save (in training `SignalCheckpoint` saves it)."""


def _raise_requeue_signal(signum: int, frame) -> None:
    raise RequeueSignal


def run_cli(main: Callable[[list[str]], None]) -> None:
    """Run a script's main(argv); configuration and input errors, a full disk, a read-only or forbidden path, Ctrl-C
    and SIGUSR1 (SLURM's requeue signal: `simmim.train.trainer.requeue_job`) end it with one line on stderr; a closed
    stdout (a pipe into head) ends it quietly.
    Until a Trainer sets it, what rank 0 alone says (rank_zero_warn, ...) goes by `launch_rank`."""
    rank_zero_only.rank = launch_rank()  # Lightning's guess misses NODE_RANK and MPI's variables
    found = signal.signal(signal.SIGUSR1, _raise_requeue_signal)
    try:
        main(sys.argv[1:])
    except (ConfigError, ValueError, FileNotFoundError, MisconfigurationException) as error:
        sys.exit(f"error: {_message(error)}")
    except BrokenPipeError:  # the reader of stdout has gone (`--help | head`): stop quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor a second error at exit's flush
        sys.exit(128 + signal.SIGPIPE)
    except OSError as error:
        fixes = {errno.ENOSPC: "", errno.EDQUOT: "", errno.EROFS: "; give a folder on a writable disk",
                 errno.EACCES: "; give a path you may read or write, or change its permissions",
                 errno.EPERM: "; give a path you may read or write, or change its permissions"}
        if error.errno not in fixes:
            raise
        where = f": {error.filename}" if error.filename else ""
        sys.exit(f"error: {error.strerror}{where}{fixes[error.errno]}")
    except KeyboardInterrupt:  # Ctrl-C outside training (which saves its step: SignalCheckpoint), to every rank
        if launch_rank() == 0:
            print("stopped by Ctrl-C", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except RequeueSignal:
        from lightning_fabric.plugins.environments import SLURMEnvironment

        from simmim.train.trainer import requeue_job
        print("stopped by SIGUSR1 (outside training: no step to save)", file=sys.stderr)
        if launch_rank() == 0 and SLURMEnvironment.detect():
            print(requeue_job(), file=sys.stderr)
        sys.exit(128 + signal.SIGUSR1)
    finally:
        signal.signal(signal.SIGUSR1, found)


def _message(error: Exception) -> str:
    """The error's message; one raised in a DataLoader worker arrives with the worker's traceback in it
    ("Caught ValueError in DataLoader worker process 0. Original Traceback ... ValueError: MESSAGE"): MESSAGE."""
    text = str(error)
    if "\nOriginal Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return last.removeprefix(f"{type(error).__name__}: ")


def check_new_output(path: str | Path, overwrite: bool, key: str = "out") -> None:
    """Raise ConfigError when `path` exists (a file, or a folder that is not empty) and overwrite is false: a tool
    never writes over what a user already has unless told to."""
    path = Path(path)
    if overwrite or not path.exists() or path.is_dir() and not any(path.iterdir()):
        return
    what = "the folder" if path.is_dir() else "the file"
    raise ConfigError(f"{key}={path}: {what} exists; give another {key}= or add overwrite=true to replace it")


@contextmanager
def keeping_earlier(*paths: str | Path) -> Iterator[list[Path]]:
    """Temporary files for the block to write `paths` through (`written_atomically`). Once the block has written
    them, an earlier file at each path is moved aside to `<stem>.<UTC time><suffix>` beside it, with a line on
    stderr (stdout may be a tool's JSON): a rerun of a measurement keeps the one before. The time is when that
    result was made, its file's last write (the latest of the files: one result, one stamp). When the block fails,
    nothing moves."""
    paths = [Path(path) for path in paths]
    if folder := next((path for path in paths if path.exists() and not path.is_file()), None):
        raise ConfigError(f"{folder} is a folder (or no plain file), where the result is written; move it away or "
                          f"write the result elsewhere")
    with ExitStack() as stack:
        temporaries = [stack.enter_context(written_atomically(path)) for path in paths]
        yield temporaries
        earlier = [path for path in paths if path.exists()]
        if earlier:
            stamp = utc_stamp(max(path.stat().st_mtime for path in earlier))
        for path in earlier:
            kept = _free_name(path, stamp)
            os.replace(path, kept)
            print(f"kept the earlier {path.name} as {kept}", file=sys.stderr)


def _free_name(path: Path, stamp: str) -> Path:
    """`<stem>.<stamp><suffix>` beside path, or `<stem>.<stamp>-2<suffix>`, -3, ... where that name is taken (a file
    copied with its time): nothing is moved onto a kept file."""
    tags = itertools.chain([""], (f"-{n}" for n in itertools.count(2)))
    return next(name for name in (path.with_name(f"{path.stem}.{stamp}{tag}{path.suffix}") for tag in tags)
                if not name.exists())


def check_result_file(path: str | Path, is_result: Callable[[Path], bool], tool: str, key: str = "out",
                      folder: str | Path | None = None) -> None:
    """Raise ConfigError, before a tool's work, when `path` cannot take its result: a folder is there, a file that
    is not the tool's earlier result (is_result false: an earlier one is kept aside by `keeping_earlier`, any other
    is the user's), a file is where a folder above it would be (`check_output_folder`), or the folder it would go
    in cannot be written to. tool: what the message calls it (this <tool>); folder: the value of `key` where that
    names the folder path goes in (out_dir=)."""
    path = Path(path)
    given, what, new = (path, "the file", "name") if folder is None else (folder, path, "folder")
    if path.is_dir():
        raise ConfigError(f"{key}={path} is a folder; pass the path of a .{path.suffix.lstrip('.') or 'json'} file "
                          f"to write" if folder is None else
                          f"{key}={folder}: {path} is a folder; move it away or give another {key}=")
    if path.is_file() and not is_result(path):
        raise ConfigError(f"{key}={given}: {what} exists and is not a result of this {tool}; give another {key}= "
                          f"(a new {new})")
    check_output_folder(path.parent, key)
    existing = next(above for above in path.absolute().parents if above.exists())
    if not os.access(existing, os.W_OK | os.X_OK):  # a read-only disk too
        raise ConfigError(f"{key}={given}: {existing} cannot be written to; give a path on a writable disk")


def json_with(*keys: str) -> Callable[[Path], bool]:
    """`check_result_file`'s is_result for a JSON result: whether a file holds a JSON object with these keys."""
    def is_result(path: Path) -> bool:
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError):  # unreadable, not text, not JSON
            return False
        return isinstance(value, dict) and all(key in value for key in keys)
    return is_result


def starting_with(start: bytes) -> Callable[[Path], bool]:
    """`check_result_file`'s is_result for a CSV (its header line) or a picture (its format's signature)."""
    def is_result(path: Path) -> bool:
        try:
            with open(path, "rb") as file:
                return file.read(len(start)) == start
        except OSError:  # unreadable
            return False
    return is_result


def check_output_folder(path: str | Path, key: str = "out_dir") -> None:
    """Raise ConfigError when `path`, or a folder above it, is a file: it cannot become the output folder."""
    for folder in (Path(path), *Path(path).parents):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"{key}={path}: {folder} is a file; pass a folder (new or existing)")


def check_values(cfg, checks: tuple[tuple[str, bool, str], ...]) -> None:
    """ConfigError `KEY=VALUE: expected WHAT` for the first (dotted key, whether its value is good, what is expected)
    of checks that fails: a tool's ranges, after options_from_argv has checked the types."""
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)}: expected {expected}")


def checkpoint_paths(value) -> list[str]:
    """`checkpoint=` as a list of paths (`as_list`), each found before the first is read: a mistyped third path
    must not end a run after the first two were evaluated."""
    from simmim.models.checkpoint import read_checkpoint

    paths = as_list(value)
    for path in paths:
        if not Path(path).is_file() and not (Path(path) / "config.json").is_file():
            read_checkpoint(path)  # its one-line FileNotFoundError
    return paths


def check_loader_options(cfg) -> None:
    """ConfigError unless cfg.batch_size >= 1 and cfg.num_workers >= 0 (the tools' DataLoader keys)."""
    check_values(cfg, (("batch_size", cfg.batch_size >= 1, "an integer >= 1"),
                       ("num_workers", cfg.num_workers >= 0, "an integer >= 0 (0: load in this process)")))


def resolve_device(name: str) -> torch.device:
    """`auto` (the first CUDA device when there is one, else CPU) or a torch device name such as cpu, cuda:1."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
    return device
