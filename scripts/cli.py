"""Both stages through the Lightning CLI, from the same recipes.

`python scripts/cli.py --help`; the code is in finetune.lightning_cli.
"""
from simmim.cli import run

if __name__ == "__main__":
    run("finetune.lightning_cli")
