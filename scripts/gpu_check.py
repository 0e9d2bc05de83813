"""A few training steps of each trainer.strategy on one GPU.

`python scripts/gpu_check.py --help`; the code is in simmim.tools.gpu_check.
"""
from simmim.cli import run

if __name__ == "__main__":
    run("simmim.tools.gpu_check")
