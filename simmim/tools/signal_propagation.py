"""Signal propagation (SwinV2 paper, Figure 2): the RMS amplitude of every block's output, block after block,
residual post-norm against pre-norm.

    python scripts/signal_propagation.py                      # the demo recipe's model, both norms, 30 steps
    python scripts/signal_propagation.py model.embed_dim=16 model.depths=[2,12] model.num_heads=[2,4] model.img_size=32
    python scripts/signal_propagation.py variants=[tiny,small] model.img_size=64 model.window_size=4 steps=20
    python scripts/signal_propagation.py checkpoint=[runs/pretrain/default/encoder.pth,runs/other/last.ckpt]

Fresh models: one curve per (variant, norm mode), each built from recipes/pretrain/default.yaml's model
section <- the variant (variants=null: none) <- model.* keys, with model.norm_mode set to each of norm_modes,
from the same seed. `steps=N` then trains each for N AdamW steps (constant lr, no decay on norms and biases)
on the SimMIM loss with random masks over the train split of the data; every curve sees the same batches and
masks (steps=null: 30). Checkpoints: one curve per file (any layout simmim/models/checkpoint.py loads; model.* keys
override its saved config), measured as they are (norm_modes, variants and steps apply to fresh models only).

The amplitude of a block is sqrt(mean(x^2)) of its output x (B, H, W, C), the main branch after both residual
additions, over a fixed batch: the first batch_size images of the data's validation split (eval transform),
or Gaussian noise for data.source=random.

At initialization the comparison says little: the official init zeroes the res-post-norm LayerNorms, so every
such block is the identity (a flat curve), and pre-norm branches with 0.02-std weights hardly add to the main
branch either. The pre-norm growth appears once the weights train: measure with steps > 0.

Writes <out_dir>/signal_propagation.csv (curve, norm_mode, block_index, stage, block, rms) and
<out_dir>/signal_propagation.png (log-scale amplitude per block, dashed lines between stages); an earlier pair
there is kept beside them as signal_propagation.<UTC time it was written>.csv and .png (other files of those
names are refused).
Arguments are key=value:
"""
import csv
import math
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from simmim.models.checkpoint import encoder_from_checkpoint
from masking import build_mask_generator
from simmim.models.arguments import model_section, resolve_model
from simmim.train.config import ConfigError, as_list, load_config, options_from_argv
from simmim.data.datasets import ImageDataset
from simmim.data.decode import PNG_SIGNATURE
from simmim.data.sources import SOURCES, build_sources
from simmim.data.transforms import eval_transform
from simmim.models.simmim import build_simmim
from simmim.train.optim import param_groups
from simmim.train.validate import check_mask_patch
from simmim.plots import line_plot, save_figure
from simmim.cli import (check_result_file, check_values, checkpoint_paths, keeping_earlier, resolve_device,
                        starting_with)

SCHEMA = {
    "norm_modes": ["res_post_norm", "pre_norm"],
    "variants": None,            # e.g. [tiny,base]: the paper's widths, depths and heads; null: model.* alone
    "checkpoint": None,          # a path or [paths]: measure these instead of fresh models
    "steps": None,               # SimMIM training steps before measuring; null: 30 (fresh models), 0 (checkpoints)
    "lr": 5.0e-3,
    "weight_decay": 0.05,
    "mask_patch_size": 16,
    "mask_ratio": 0.6,
    "batch_size": 16,
    "seed": 0,
    "device": "auto",            # auto | cpu | cuda | cuda:N
    "out_dir": "runs/signal_propagation",
    "data": {"source": "digits", "root": None, "list_file": None},  # digits | folder | list | random
    "model": model_section(),    # null: the recipe's (fresh) or the checkpoint's value
}
DEFAULT_STEPS = 30
CSV_COLUMNS = ("curve", "norm_mode", "block_index", "stage", "block", "rms")
# the files written under out_dir, each with how an earlier one is known (only that is kept aside)
RESULT_FILES = {"signal_propagation.csv": starting_with(",".join(CSV_COLUMNS).encode()),
                "signal_propagation.png": starting_with(PNG_SIGNATURE)}


@torch.no_grad()
def block_amplitudes(encoder, x: torch.Tensor) -> list[tuple[int, int, float]]:
    """(stage, block within the stage, RMS of the block's output) for every SwinV2 block in order, on x (B, 3, S, S);
    ValueError when an output is not finite."""
    rows = []

    def record(stage: int, block: int):
        return lambda module, args, out: rows.append((stage, block, out.double().pow(2).mean().sqrt().item()))

    hooks = [block.register_forward_hook(record(s, b))
             for s, layer in enumerate(encoder.layers) for b, block in enumerate(layer.blocks)]
    try:
        encoder.eval()
        encoder.forward_features(x)
    finally:
        for hook in hooks:
            hook.remove()
    stage, block, rms = next((row for row in rows if not math.isfinite(row[2])), (0, 0, 0.0))
    if not math.isfinite(rms):  # a curve of inf / nan says nothing about how the amplitudes grow
        raise ValueError(f"the output of stage {stage} block {block} is not finite (RMS {rms}): the activations "
                         f"overflow; after training here, lower lr")
    return rows


def image_batches(cfg, img_size: int):
    """(fixed measuring batch (B, 3, S, S), a function drawing a random training batch), seeded by cfg.seed."""
    if cfg.data.source not in (*SOURCES, "random"):
        raise ConfigError(f"unknown data.source {cfg.data.source!r}; choose one of {', '.join(SOURCES)}, random")
    generator = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.batch_size, 3, img_size, img_size)
    if cfg.data.source == "random":
        return torch.randn(shape, generator=generator), lambda: torch.randn(shape, generator=generator)
    train, val = build_sources(cfg.data.source, img_size, cfg.data.root, cfg.data.list_file)
    train_set, val_set = ImageDataset(train, eval_transform(img_size)), ImageDataset(val, eval_transform(img_size))
    fixed = torch.stack([val_set[i][0] for i in range(min(cfg.batch_size, len(val_set)))])

    def draw() -> torch.Tensor:
        return torch.stack([train_set[int(i)][0]
                            for i in torch.randint(len(train_set), (cfg.batch_size,), generator=generator)])
    return fixed, draw


def train_simmim(simmim, draw, cfg, device: torch.device) -> float:
    """cfg.steps AdamW steps of the SimMIM loss on drawn batches with random masks; the last loss."""
    encoder = simmim.encoder
    masks = build_mask_generator("random", input_size=encoder.img_size, mask_patch_size=cfg.mask_patch_size,
                                 model_patch_size=encoder.patch_size, mask_ratio=cfg.mask_ratio, seed=cfg.seed)
    optimizer = torch.optim.AdamW(param_groups(simmim, cfg.weight_decay), lr=cfg.lr)
    simmim.train()
    loss = torch.tensor(float("nan"))
    for step in range(cfg.steps):
        x = draw().to(device)
        mask = torch.from_numpy(np.stack([masks() for _ in range(len(x))])).to(device)
        loss = simmim(x, mask)
        if not torch.isfinite(loss):
            raise ValueError(f"the SimMIM loss is {loss.item()} at step {step}: training diverged; lower lr")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if not all(torch.isfinite(p).all() for p in simmim.parameters()):  # the last step's update, which no loss saw
        raise ValueError(f"the weights are not finite after step {cfg.steps - 1}: training diverged; lower lr")
    return loss.item()


def fresh_curves(cfg, device: torch.device):
    """(label, norm mode, rows) per (variant, norm mode), trained cfg.steps steps from the same seed."""
    base = OmegaConf.to_container(load_config("pretrain").model)
    overrides = OmegaConf.to_container(cfg.model)
    if cfg.steps:  # the training masks, before any model is built (the variants keep img_size and patch_size)
        model = resolve_model(base, overrides)
        check_mask_patch("mask_patch_size", cfg.mask_patch_size, model["img_size"], model["patch_size"])
    for variant in as_list(cfg.variants) or [overrides["variant"]]:
        for norm_mode in as_list(cfg.norm_modes):
            torch.manual_seed(cfg.seed)
            model = resolve_model(base, {**overrides, "variant": variant, "norm_mode": norm_mode})
            simmim = build_simmim(model).to(device)
            fixed, draw = image_batches(cfg, model["img_size"])
            label = f"{variant} {norm_mode}" if variant else norm_mode
            if cfg.steps:
                print(f"{label}: SimMIM loss {train_simmim(simmim, draw, cfg, device):.4f} after {cfg.steps} steps")
            yield label, norm_mode, block_amplitudes(simmim.encoder, fixed.to(device))


def checkpoint_curves(cfg, device: torch.device):
    """(label, norm mode, rows) per checkpoint file, measured as loaded."""
    if cfg.variants or cfg.steps:
        raise ConfigError("variants and steps apply to fresh models; drop them, or drop checkpoint=...")
    for path in checkpoint_paths(cfg.checkpoint):
        encoder, model, _ = encoder_from_checkpoint(path, OmegaConf.to_container(cfg.model))
        fixed, _ = image_batches(cfg, model["img_size"])
        norm_mode = encoder.layers[0].blocks[0].norm_mode
        yield f"{path} ({norm_mode})", norm_mode, block_amplitudes(encoder.to(device), fixed.to(device))


def write_outputs(curves: list, out_dir: Path, title: str) -> tuple[Path, Path]:
    """The CSV (CSV_COLUMNS) and the PNG plot of every curve (earlier ones kept aside: `keeping_earlier`)."""
    csv_path, png_path = (out_dir / name for name in RESULT_FILES)
    stages = [stage for stage, _, _ in curves[0][2]]
    boundaries = [i - 0.5 for i in range(1, len(stages)) if stages[i] != stages[i - 1]]
    series = {label: (range(len(rows)), [rms for _, _, rms in rows]) for label, _, rows in curves}
    figure = line_plot(series, title=title, x_label="block (all stages, in order)",
                       y_label="RMS of the block output", log_y=True, vlines=boundaries)
    with keeping_earlier(csv_path, png_path) as (csv_tmp, png_tmp):
        with open(csv_tmp, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(CSV_COLUMNS)
            for label, norm_mode, rows in curves:
                writer.writerows((label, norm_mode, i, stage, block, f"{rms:.6g}")
                                 for i, (stage, block, rms) in enumerate(rows))
        save_figure(figure, png_tmp)
    return csv_path, png_path


def main(argv: list[str]) -> None:
    cfg = options_from_argv(SCHEMA, argv, __doc__)
    if cfg is None:
        return
    check_values(cfg, (("steps", cfg.steps is None or type(cfg.steps) is int and cfg.steps >= 0,
                        "an integer >= 0, or null"), ("batch_size", cfg.batch_size >= 1, "an integer >= 1"),
                       ("lr", cfg.lr > 0, "a number > 0"), ("weight_decay", cfg.weight_decay >= 0, "a number >= 0")))
    if not as_list(cfg.norm_modes):
        raise ConfigError(f"norm_modes={cfg.norm_modes}: expected one or more of res_post_norm, pre_norm")
    for name, is_result in RESULT_FILES.items():
        check_result_file(Path(cfg.out_dir) / name, is_result, "signal propagation measurement", "out_dir", cfg.out_dir)
    device = resolve_device(cfg.device)
    if not cfg.checkpoint and cfg.steps is None:
        cfg.steps = DEFAULT_STEPS
    curves = list(checkpoint_curves(cfg, device) if cfg.checkpoint else fresh_curves(cfg, device))
    trained = f" after {cfg.steps} SimMIM steps" if cfg.steps else ""
    csv_path, png_path = write_outputs(curves, Path(cfg.out_dir), f"Signal propagation{trained}")
    for label, _, rows in curves:
        first, last = rows[0][2], rows[-1][2]
        print(f"{label}: RMS first block {first:.4g}, last block {last:.4g}, last / first {last / first:.3g}")
    print(f"csv: {csv_path}\nplot: {png_path}")

