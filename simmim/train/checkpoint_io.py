"""Files that a crash cannot leave half-written (checkpoints, configs, logs, exports), and the checkpoints a run
can resume from."""
from __future__ import annotations

import errno
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_warn


UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it) and put back at once
os.umask(UMASK)


def usual_permissions(path: str | Path) -> None:
    """The mode a plain open() gives a new file (0o666 less the umask): mkstemp and safetensors create files that
    only their owner can read, which hid checkpoints and exports from the rest of a group on a shared cluster."""
    os.chmod(path, 0o666 & ~UMASK)


# the name of written_atomically's temporary files: `.<name>.<mkstemp's 8 random characters>.tmp`
TEMPORARY_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


@contextmanager
def written_atomically(path: str | Path) -> Iterator[Path]:
    """A temporary file beside path (`TEMPORARY_NAME`) for the block to write; when the block ends, it is synced to
    disk, given the usual permissions and renamed onto path, so a crash leaves the old file or the new one, never
    half of one; when the block fails, it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        usual_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj, path: str | Path) -> None:
    """torch.save through `written_atomically`. A full disk or quota is one OSError (ENOSPC / EDQUOT) naming the
    file and the fix (torch reports it as a RuntimeError about zip positions)."""
    with written_atomically(path) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(obj, f)
        except BaseException as error:
            if full := _disk_full(error):
                raise OSError(full.errno, f"{os.strerror(full.errno).lower()} for {path}: the disk filled after "
                                          f"{tmp.stat().st_size / 2**20:.0f} MiB of it; free space or pass "
                                          f"output_dir= on another disk, then run the same command again (the "
                                          f"checkpoints already saved are kept)") from error
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


class Resumable(NamedTuple):
    """A checkpoint a run can resume from: its path, and its contents read with the tensors left on disk (mmap;
    None for a DeepSpeed folder), which the checks before a resume read instead of loading it again."""
    path: str
    checkpoint: dict | None

    @property
    def step(self) -> int:
        """Its global step; -1 where unknown (a DeepSpeed folder)."""
        return -1 if self.checkpoint is None else int(self.checkpoint.get("global_step", -1))


def read_resumable(path: str | Path, read: Resumable | None = None) -> Resumable:
    """The checkpoint at path, or ValueError saying why it cannot be resumed from (truncated, corrupt, not a
    training checkpoint). Reads the pickled structure; the tensors stay on disk (mmap). DeepSpeed folders pass when
    they hold its `checkpoint/` folder. `read`: a checkpoint read already, returned as it is when it is path's."""
    path = Path(path)
    if read is not None and read.path == str(path):
        return read
    if path.is_dir():  # DeepSpeed saves a folder: <path>/checkpoint/ (its tag) and <path>/latest
        if not (path / "checkpoint").is_dir():
            raise ValueError("a folder, not a checkpoint file or a DeepSpeed checkpoint folder")
        return Resumable(str(path), None)
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as error:  # truncated zip, bad pickle, ...: any failure means it cannot be resumed
        raise ValueError(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'unreadable'}") \
            from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "loops" not in checkpoint:
        raise ValueError("not a Lightning training checkpoint (no state_dict or loop state)")
    return Resumable(str(path), checkpoint)


def checkpoint_problem(path: str | Path) -> str | None:
    """Why a checkpoint cannot be resumed from (`read_resumable`), or None when it can."""
    try:
        read_resumable(path)
    except ValueError as problem:
        return str(problem)
    return None


def read_checkpoints(paths: list[Path]) -> tuple[list[Resumable], dict[Path, ValueError]]:
    """The checkpoints at paths that can be resumed from (`read_resumable`), in their order, and why the others
    cannot."""
    readable, problems = [], {}
    for path in paths:
        try:
            readable.append(read_resumable(path))
        except ValueError as problem:
            problems[path] = problem
    return readable, problems


def newest_good_checkpoint(folder: str | Path) -> Resumable | None:
    """The resumable checkpoint in folder of the highest global step (a copy of the folder that did not keep the
    modification times must not send the run back to an earlier one; a DeepSpeed folder counts as step -1), the
    newest of those; every bad one newer than it is named in a warning. None when there is none."""
    candidates = sorted(Path(folder).glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    readable, problems = read_checkpoints(candidates)
    chosen, best = None, -2
    for found in readable:
        if found.step > best:  # strictly higher: of equal steps the newest (the first seen) stays
            chosen, best = found, found.step
    for path in candidates:
        if chosen is not None and str(path) == chosen.path:
            break
        if path in problems:
            rank_zero_warn(f"checkpoint {path} cannot be resumed from ({problems[path]}); trying the next newest",
                           stacklevel=5)  # every rank reads the folder
    return chosen
