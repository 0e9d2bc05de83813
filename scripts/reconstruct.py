"""SimMIM reconstructions of images at a chosen mask ratio.

`python scripts/reconstruct.py --help`; the code is in simmim.tools.reconstruct.
"""
from simmim.cli import run

if __name__ == "__main__":
    run("simmim.tools.reconstruct")
