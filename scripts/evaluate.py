"""k-NN and linear-probe top-1 of any checkpoint's frozen encoder.

`python scripts/evaluate.py --help`; the code is in simmim.tools.evaluate.
"""
from simmim.cli import run

if __name__ == "__main__":
    run("simmim.tools.evaluate")
