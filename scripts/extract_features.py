"""Pooled and per-stage features of any checkpoint.

`python scripts/extract_features.py --help`; the code is in simmim.tools.extract_features.
"""
from simmim.cli import run

if __name__ == "__main__":
    run("simmim.tools.extract_features")
