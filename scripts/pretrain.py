"""SimMIM pretraining of a Swin Transformer V2 encoder.

    python scripts/pretrain.py                                   # the demo: a tiny SwinV2 on the bundled digits
    python scripts/pretrain.py recipe=base data.source=folder data.root=/data/imagenet/train trainer.devices=8
    python scripts/pretrain.py recipe=giant print_config=true    # show the resolved config and exit

Arguments are key=value: recipe=NAME (recipes/pretrain/NAME.yaml or a path), any key of the recipe, any
pytorch_lightning.Trainer argument as trainer.NAME. The run directory (output_dir/run_name) gets the resolved
config, checkpoints (last, best), logs (TensorBoard, CSV), reconstruction pictures and encoder.pth.
"""
import pytorch_lightning as pl
from omegaconf import OmegaConf

from simmim.config import config_from_argv, prepare_run, save_config
from simmim.data import SimMIMDataModule
from simmim.module import ReconstructionPictures, SimMIMPretrainModule, ThroughputMonitor
from simmim.run import make_trainer, run_cli
from simmim.strategies import full_state_dict


def main(argv: list[str]) -> None:
    parsed = config_from_argv("pretrain", argv, __doc__)
    if parsed is None:
        return
    cfg, print_config = parsed
    if print_config:
        print(OmegaConf.to_yaml(cfg), end="")
        return
    run_dir, ckpt_path = prepare_run(cfg)
    pl.seed_everything(cfg.seed, workers=True)

    data = SimMIMDataModule(
        source=cfg.data.source, root=cfg.data.root, list_file=cfg.data.list_file, img_size=cfg.data.img_size,
        batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers, mask_kind=cfg.simmim.mask_kind,
        mask_patch_size=cfg.simmim.mask_patch_size, model_patch_size=cfg.model.patch_size,
        mask_ratio=cfg.simmim.mask_ratio, seed=cfg.seed)
    data.setup("fit")  # bad data paths fail here, before anything is written
    module = SimMIMPretrainModule(model=OmegaConf.to_container(cfg.model),
                                  norm_target_patch_size=cfg.simmim.norm_target_patch_size,
                                  **OmegaConf.to_container(cfg.optim))
    save_config(cfg, run_dir / "config.yaml")

    pictures = ReconstructionPictures(run_dir / "reconstructions", cfg.logging.recon_every_n_steps,
                                      cfg.logging.recon_images)
    trainer = make_trainer(cfg, run_dir, monitor="val/loss", mode="min", callbacks=[ThroughputMonitor(), pictures])
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)

    state = full_state_dict(trainer.strategy)  # on every rank: sharding strategies gather the weights here
    if trainer.is_global_zero:
        encoder = module.export_encoder(run_dir / "encoder.pth", OmegaConf.to_container(cfg), state)
        print(f"run directory: {run_dir}\nreconstructions: {pictures.last_path}\nencoder: {encoder}")


if __name__ == "__main__":
    run_cli(main)
