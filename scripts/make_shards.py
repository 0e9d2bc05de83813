"""Pack an image folder or list into WebDataset tar shards for data.source=shards.

`python scripts/make_shards.py --help`; the code is in simmim.tools.make_shards.
"""
from simmim.cli import run

if __name__ == "__main__":
    run("simmim.tools.make_shards")
