"""GiB per GPU of a recipe for every memory saver and sharding stage.

`python scripts/plan_memory.py --help`; the code is in simmim.tools.plan_memory.
"""
from simmim.cli import run

if __name__ == "__main__":
    run("simmim.tools.plan_memory")
