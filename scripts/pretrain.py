"""SimMIM pretraining of a SwinV2 encoder.

`python scripts/pretrain.py --help`; the code is in simmim.pretrain.
"""
from simmim.cli import run

if __name__ == "__main__":
    run("simmim.pretrain")
