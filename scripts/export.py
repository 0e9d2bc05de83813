"""Export an encoder to timm, Hugging Face transformers or the official layout.

`python scripts/export.py --help`; the code is in simmim.tools.export.
"""
from simmim.cli import run

if __name__ == "__main__":
    run("simmim.tools.export")
