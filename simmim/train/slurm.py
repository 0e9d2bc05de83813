"""SLURM's requeue convention, as Lightning uses it: the job asks for SIGUSR1 some time before its limit (`#SBATCH
--signal=USR1@300`); on it the run saves its step (`simmim.train.trainer.SignalCheckpoint`; outside training there is
nothing to save) and puts its job back in the queue, and the job's next start continues from that step."""
from __future__ import annotations

import os
import signal
import subprocess

from lightning_fabric.plugins.environments import SLURMEnvironment

REQUEUE_SIGNAL = signal.SIGUSR1


def in_slurm_job() -> bool:
    """Whether srun started this process in a batch job (Lightning's test: SLURM_NTASKS set, not an interactive
    shell)."""
    return SLURMEnvironment.detect()


def requeue_job() -> str:
    """Put this SLURM job back in the queue (`scontrol requeue`; an array task by its array job id and task id) and
    return the line to print: what was done, or why not and what to do instead."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array else os.environ.get("SLURM_JOB_ID", "")
    again = "submit the job again to continue the run"
    if not job:
        return f"not requeued: SLURM_JOB_ID is not set; {again}"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"could not requeue SLURM job {job} (scontrol requeue: {error}); {again}"
    if done.returncode:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"status {done.returncode}"
        return (f"could not requeue SLURM job {job} (scontrol requeue: {reason}); {again}, or let it be requeued: "
                f"#SBATCH --requeue")
    return f"requeued SLURM job {job}: its next start continues the run"
