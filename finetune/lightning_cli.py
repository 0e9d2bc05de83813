"""The pretraining LightningModule and DataModule through the Lightning CLI.

    python scripts/cli.py fit --config recipes/cli/pretrain_default.yaml
    python scripts/cli.py fit --help
"""
from pytorch_lightning.cli import LightningCLI

from simmim.data import SimMIMDataModule
from simmim.pretrain import SimMIMPretrainModule


def main() -> None:
    LightningCLI(SimMIMPretrainModule, SimMIMDataModule, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
