"""Checkpoint files that a crash cannot leave half-written."""
from __future__ import annotations

import errno
import os
import tempfile
import warnings
from pathlib import Path

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO


UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it) and put back at once
os.umask(UMASK)


def usual_permissions(path: str | Path) -> None:
    """The mode a plain open() gives a new file (0o666 less the umask): mkstemp and safetensors create files that
    only their owner can read, which hid checkpoints and exports from the rest of a group on a shared cluster."""
    os.chmod(path, 0o666 & ~UMASK)


def atomic_save(obj, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename: a crash never leaves half a file.
    A full disk or quota is one OSError (ENOSPC / EDQUOT) naming the file and the fix (torch reports it as a
    RuntimeError about zip positions)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        usual_permissions(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        written = Path(tmp).stat().st_size if Path(tmp).exists() else 0
        Path(tmp).unlink(missing_ok=True)
        if full := _disk_full(error):
            raise OSError(full.errno, f"{os.strerror(full.errno).lower()} for {path}: the disk filled after "
                                      f"{written / 2**20:.0f} MiB of it; free space or pass output_dir= on another "
                                      f"disk, then run the same command again (the checkpoints already saved are "
                                      f"kept)") from error
        raise


def _disk_full(error: BaseException | None) -> OSError | None:
    """The ENOSPC or EDQUOT OSError in error's chain (torch.save raises its own error while handling it), if any."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        error = error.__cause__ or error.__context__
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary file and renamed into place."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        atomic_save(checkpoint, path)


def checkpoint_problem(path: str | Path) -> str | None:
    """Why a Lightning checkpoint cannot be resumed from (truncated, corrupt, not a training checkpoint), or
    None when it can. Reads the pickled structure; the tensors stay on disk (mmap). DeepSpeed folders pass when they
    hold its `checkpoint/` folder."""
    return _inspect(path)[0]


def _inspect(path: str | Path) -> tuple[str | None, int]:
    """(`checkpoint_problem`, its global step; -1 where unknown: a DeepSpeed folder, a bad file)."""
    path = Path(path)
    if path.is_dir():  # DeepSpeed saves a folder: <path>/checkpoint/ (its tag) and <path>/latest
        return (None if (path / "checkpoint").is_dir() else "a folder, not a checkpoint file or a DeepSpeed "
                                                            "checkpoint folder"), -1
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as error:  # truncated zip, bad pickle, ...: any failure means it cannot be resumed
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'unreadable'}", -1
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "loops" not in checkpoint:
        return "not a Lightning training checkpoint (no state_dict or loop state)", -1
    return None, int(checkpoint.get("global_step", -1))


def newest_good_checkpoint(folder: str | Path) -> Path | None:
    """The resumable checkpoint in folder of the highest global step (a copy of the folder that did not keep the
    modification times must not send the run back to an earlier one), the newest of those; every bad one newer
    than it is named in a warning. None when there is none."""
    candidates = sorted(Path(folder).glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    inspected = [(path, *_inspect(path)) for path in candidates]
    good = [(step, -order, path) for order, (path, problem, step) in enumerate(inspected) if problem is None]
    chosen = max(good)[2] if good else None
    for path, problem, _ in inspected:
        if path == chosen:
            break
        if problem is not None:
            warnings.warn(f"checkpoint {path} cannot be resumed from ({problem}); trying the next newest", stacklevel=2)
    return chosen
