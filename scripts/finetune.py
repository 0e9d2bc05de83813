"""Fine-tune a pretrained SwinV2 encoder for classification at a larger window.

`python scripts/finetune.py --help`; the code is in finetune.train.
"""
from simmim.cli import run

if __name__ == "__main__":
    run("finetune.train")
