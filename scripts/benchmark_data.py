"""Input-pipeline benchmark: images/s per worker of the folder and shards sources against a decode-then-crop baseline.

`python scripts/benchmark_data.py --help`; the code is in simmim.tools.benchmark_data.
"""
from simmim.cli import run

if __name__ == "__main__":
    run("simmim.tools.benchmark_data")
