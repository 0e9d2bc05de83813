"""Both stages through the Lightning CLI, from the same recipes as scripts/pretrain.py and scripts/finetune.py.

    python scripts/cli.py fit --stage pretrain --recipe default --trainer.max_epochs 2
    python scripts/cli.py fit --stage finetune --recipe default --run.pretrained runs/pretrain/default/encoder.pth
    python scripts/cli.py fit --stage finetune --print_config        # the resolved config, then exit
    python scripts/cli.py fit --stage pretrain --help

`simmim.train.lightning_cli` says how a recipe becomes the CLI's config. This module sits in `finetune`, the
package on top, because it offers both stages.
"""
import finetune.train
import simmim.pretrain
from simmim.train.lightning_cli import RecipeCLI
from simmim.train.trainer import signal_exit_status


def main(argv: list[str]) -> None:
    with signal_exit_status():
        RecipeCLI({"pretrain": simmim.pretrain.stage(), "finetune": finetune.train.stage()}, argv)
