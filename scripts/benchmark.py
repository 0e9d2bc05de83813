"""Speed and peak memory of one SimMIM training step.

`python scripts/benchmark.py --help`; the code is in simmim.tools.benchmark.
"""
from simmim.cli import run

if __name__ == "__main__":
    run("simmim.tools.benchmark")
