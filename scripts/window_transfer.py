"""Paper Table 1: classifiers evaluated at larger windows.

`python scripts/window_transfer.py --help`; the code is in finetune.window_transfer.
"""
from simmim.cli import run

if __name__ == "__main__":
    run("finetune.window_transfer")
