"""Export an encoder for the tools users already have: timm, Hugging Face transformers, the official layout.

    python scripts/export.py checkpoint=runs/finetune/default/checkpoints/best.ckpt format=timm out=swinv2.safetensors
    python scripts/export.py checkpoint=runs/pretrain/default/encoder.pth format=hf out=swinv2-hf/
    python scripts/export.py checkpoint=timm_swinv2.safetensors format=official out=swinv2.pth model.window_size=8

- `timm`: a safetensors state dict in the key layout of timm's `SwinTransformerV2` (patch merging at the
  start of the next stage, the classifier as `head.fc`), which that model built with the same settings loads
  with strict=True. The settings are printed and stored in the file's metadata (`timm_kwargs`).
- `hf`: a folder with `config.json` and `model.safetensors` for `transformers.Swinv2Model.from_pretrained`
  (`Swinv2ForImageClassification` when the checkpoint has a classifier head, `Swinv2ForMaskedImageModeling`,
  encoder with mask token and SimMIM decoder, for a pretraining checkpoint).
- `official`: a `.pth` in the microsoft/Swin-Transformer layout: `{"model": SimMIM state dict, "config"}` for
  pretraining checkpoints (as scripts/pretrain.py writes encoder.pth), `{"model": encoder state dict with head,
  "config"}` otherwise.

The checkpoint is any layout `simmim.models.checkpoint` reads (.ckpt, .pth, .safetensors); the model is built
from the config our checkpoints carry, model.* keys override it (official and timm files carry none).
Arguments are key=value:
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from omegaconf import OmegaConf

from simmim.cli import check_new_output
from simmim.models.checkpoint import (HF_CONFIG, HF_DECODER, checkpoint_weights, class_names, detect_layout,
                                      ema_weights, has_simmim_decoder, hf_key, load_weights, model_config,
                                      read_checkpoint, saved_simmim_config, simmim_from_checkpoint, stage_windows)
from simmim.models.simmim import SimMIM
from simmim.models.swinv2 import DERIVED_BUFFERS, SwinTransformerV2
from simmim.models.arguments import model_defaults, model_section
from simmim.train.checkpoint_io import atomic_save, written_atomically
from simmim.train.config import ConfigError, options_from_argv

__all__ = ["FORMATS", "to_timm", "to_hf", "hf_config", "timm_kwargs", "encoder_for_export", "export_timm",
           "export_hf", "export_official", "main"]

FORMATS = ("timm", "hf", "official")
SCHEMA = {
    "checkpoint": None,       # required: any checkpoint simmim.models.checkpoint reads
    "format": None,           # required: timm | hf | official
    "out": None,              # required: a .safetensors file (timm), a folder (hf), a .pth file (official)
    "overwrite": False,       # replace an existing out (hf: its config.json and weights, sharded ones too)
    "ema": False,             # a fine-tuning checkpoint's EMA weights (train.ema_decay) instead of the live ones
    "model": model_section(),  # null: the checkpoint's value
}
# SwinTransformerV2 settings that neither timm's nor transformers' SwinV2 has: (argument, the value they build)
PLAIN_SWINV2 = (("ape", False), ("patch_norm", True), ("norm_mode", "res_post_norm"), ("attn_mode", "cosine"),
                ("position_bias", "log_cpb"), ("extra_norm_every", 0))


def _check_plain(config: Mapping, target: str) -> None:
    for name, value in PLAIN_SWINV2:
        if config.get(name, value) != value:
            raise ValueError(f"{target} has no SwinV2 with {name}={config[name]!r}; only {name}={value!r} "
                             f"models export to {target} (use format=official)")


def _encoder_state(state_dict: Mapping) -> dict:
    """Our state dict without derived buffers, each tensor contiguous and unshared (as safetensors wants)."""
    return {key: value.detach().cpu().contiguous().clone() for key, value in state_dict.items()
            if key.rsplit(".", 1)[-1] not in DERIVED_BUFFERS}


# ------------------------------------------------------------------------------------------------- timm
def to_timm(state_dict: Mapping) -> dict:
    """Our (official) keys -> timm's: `layers.{i}.downsample.*` -> `layers.{i+1}.downsample.*`, `head.*` ->
    `head.fc.*`; derived buffers are left out (timm recomputes them). The inverse of the `timm` reader in
    simmim.models.checkpoint."""
    out = {}
    for key, value in _encoder_state(state_dict).items():
        key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m[1]) + 1}.downsample.", key)
        out[re.sub(r"^head\.", "head.fc.", key)] = value
    return out


def portable_windows(config: Mapping) -> list[int]:
    """`pretrained_window_sizes` for timm and transformers, which divide the CPB offsets by (pretrained window - 1)
    or, for 0, (the stage's window - 1) with no guard: a stage whose divisor would be 0 (pretrained window 1, or
    a 1x1 window, as the last stage of a 32 px model has) gets 2, whose divisor 1 is the one ours uses there (all
    of its offsets are 0 with a 1x1 window; ours divides by at least 1), instead of NaN everywhere after it."""
    windows = stage_windows(config)
    given = list(config.get("pretrained_window_sizes") or [0] * len(windows))
    return [2 if (pretrained or window) <= 1 else pretrained for pretrained, window in zip(given, windows)]


def timm_kwargs(config: Mapping) -> dict:
    """Arguments of `timm.models.swin_transformer_v2.SwinTransformerV2` for the same model."""
    _check_plain(config, "timm")
    keys = ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depths", "num_heads", "window_size",
            "mlp_ratio", "qkv_bias")
    kwargs = {key: config[key] for key in keys if key in config}
    return {**{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
            "pretrained_window_sizes": portable_windows(config)}


# ------------------------------------------------------------------------------------------ transformers
def to_hf(state_dict: Mapping) -> dict:
    """Our keys -> transformers' `Swinv2Model` keys; the fused qkv weight is split into query, key and value
    (the key projection has no bias, as in the official code). With a classifier head the keys are those of
    `Swinv2ForImageClassification`: `swinv2.*` and `classifier.*`; a SimMIM state dict (`encoder.*`, `decoder.0.*`)
    gives those of `Swinv2ForMaskedImageModeling`: `swinv2.*` (with the mask token) and `decoder.0.*`."""
    ours = _encoder_state(state_dict)
    if any(key.startswith(HF_DECODER) for key in ours):
        encoder = {key.removeprefix("encoder."): value for key, value in ours.items() if key.startswith("encoder.")}
        return {**{"swinv2." + key: value for key, value in to_hf(encoder).items()},
                **{key: value for key, value in ours.items() if key.startswith(HF_DECODER)}}
    prefix = "swinv2." if "head.weight" in ours else ""
    out = {}
    for key, value in ours.items():
        if key.startswith("head."):
            out["classifier." + key.removeprefix("head.")] = value
        elif key.endswith(".attn.qkv.weight"):
            base = hf_key(key.replace("attn.qkv.weight", "attn.q_bias")).removesuffix("query.bias")
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"{prefix}{base}{name}.weight"] = part.contiguous()
        else:
            out[prefix + hf_key(key)] = value
    return out


def hf_config(config: Mapping, num_classes: int = 0, simmim: bool = False, names: list[str] = ()) -> dict:
    """config.json of transformers' Swinv2 for the same model (`model_type` swinv2): Swinv2Model, with
    num_classes Swinv2ForImageClassification (id2label: `names`, else LABEL_i), with simmim
    Swinv2ForMaskedImageModeling."""
    _check_plain(config, "transformers")
    defaults = model_defaults()
    cfg = {**defaults, **config}
    depths = list(cfg["depths"])
    architecture = ("Swinv2ForMaskedImageModeling" if simmim else
                    "Swinv2ForImageClassification" if num_classes else "Swinv2Model")
    hf = {
        "model_type": "swinv2",
        "architectures": [architecture],
        **{theirs: cfg[ours] for ours, theirs in HF_CONFIG.items()},
        "depths": depths, "num_heads": list(cfg["num_heads"]),
        "pretrained_window_sizes": portable_windows(cfg),
        "hidden_act": "gelu", "use_absolute_embeddings": False, "layer_norm_eps": 1e-5,
        "encoder_stride": cfg["patch_size"] * 2 ** (len(depths) - 1),
    }
    if num_classes:
        labels = list(names) if len(names) == num_classes else [f"LABEL_{i}" for i in range(num_classes)]
        hf["id2label"] = {str(i): name for i, name in enumerate(labels)}
        hf["label2id"] = {name: i for i, name in enumerate(labels)}
    return hf


# ------------------------------------------------------------------------------------------------ export
def encoder_for_export(source, overrides: Mapping | None = None) -> tuple[SwinTransformerV2, dict]:
    """(our encoder with the checkpoint's weights, with its classifier head when the checkpoint has one, its
    arguments); ValueError naming the first key when the weights do not fit."""
    ckpt = read_checkpoint(source)
    layout = detect_layout(ckpt)
    weights = checkpoint_weights(ckpt, layout)  # converted once (transformers' qkv: concatenated)
    head = weights.get("head.weight")
    config = {**model_config(ckpt, overrides), "num_classes": 0 if head is None else head.shape[0]}
    model = SwinTransformerV2(**config)
    load_weights(model, weights, layout)
    return model, config


def _save_safetensors(tensors: dict, path: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    with written_atomically(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", **metadata})


def export_timm(model: SwinTransformerV2, config: Mapping, out: str | Path, names: list[str] = ()) -> Path:
    """Write timm's state dict of `model` as safetensors; the metadata holds the timm arguments (`timm_kwargs`)
    and our model config (`config`, so our readers rebuild the model without model.* keys) with the class
    `names` where known."""
    kwargs = timm_kwargs(config)
    out = Path(out)
    ours = {"model": dict(config), **({"class_names": list(names)} if names else {})}
    _save_safetensors(to_timm(model.state_dict()), out, {"timm_kwargs": json.dumps(kwargs), "config": json.dumps(ours)})
    return out


def export_hf(model: SwinTransformerV2 | SimMIM, config: Mapping, out: str | Path, simmim: Mapping = (),
              names: list[str] = ()) -> Path:
    """Write `out/config.json` and `out/model.safetensors` for transformers' Swinv2 (a SimMIM model:
    Swinv2ForMaskedImageModeling, with its masking settings `simmim` in config.json's `simmim`, which transformers
    keeps and our reader reads back)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={out} is a file; format=hf writes a folder (config.json, model.safetensors)")
    hf = hf_config(config, config.get("num_classes", 0), simmim=isinstance(model, SimMIM), names=names)
    if simmim:
        hf["simmim"] = dict(simmim)
    _save_safetensors(to_hf(model.state_dict()), out / "model.safetensors", {})
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    for stale in _other_hf_weights(out):
        stale.unlink()
    return out


def _other_hf_weights(folder: Path) -> list[Path]:
    """The weight files of an earlier save_pretrained in `folder` that are not model.safetensors (which replaces
    them): pytorch_model.bin, and the .index.json files of sharded weights with the shards they list."""
    found = [folder / "pytorch_model.bin"]
    for index in (folder / "model.safetensors.index.json", folder / "pytorch_model.bin.index.json"):
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):  # none, or unreadable: the index alone goes
            shards = set()
        found += [index, *(folder / name for name in sorted(shards) if "/" not in name)]
    return [path for path in found if path.is_file()]


def export_official(source, overrides: Mapping | None, out: str | Path) -> Path:
    """Write the official layout: SimMIM (encoder, mask token, decoder) for pretraining checkpoints, else the
    encoder with its head; both with `config.model`, which our readers use to rebuild the model."""
    ckpt = read_checkpoint(source)
    if has_simmim_decoder(ckpt):
        simmim, config = simmim_from_checkpoint(ckpt, overrides)
        payload = {"model": simmim.state_dict(), "config": {"model": config, "simmim": saved_simmim_config(ckpt)}}
    else:
        model, config = encoder_for_export(ckpt, overrides)
        names = class_names(ckpt)
        payload = {"model": model.state_dict(),
                   "config": {"model": config, **({"class_names": names} if names else {})}}
    atomic_save(payload, out)
    return Path(out)


def main(argv: list[str]) -> None:
    cfg = options_from_argv(SCHEMA, argv, __doc__)
    if cfg is None:
        return
    if not cfg.checkpoint or not cfg.format or not cfg.out:
        raise ConfigError("checkpoint=, format= and out= are required, e.g. checkpoint=runs/pretrain/default/"
                          "encoder.pth format=timm out=swinv2.safetensors")
    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format} is not one of {', '.join(FORMATS)}")
    suffix = Path(cfg.out).suffix
    if (cfg.format == "timm") != (suffix == ".safetensors") and cfg.format != "hf":  # readers go by the suffix
        wanted = ".safetensors (a safetensors file)" if cfg.format == "timm" else ".pth (a torch.save file)"
        raise ConfigError(f"out={cfg.out}: format={cfg.format} writes {wanted}; name it so, e.g. "
                          f"out={Path(cfg.out).with_suffix(wanted.split()[0])}")
    if cfg.format != "hf" and Path(cfg.out).is_dir():
        raise ConfigError(f"out={cfg.out} is a folder; format={cfg.format} writes a file, e.g. out="
                          f"{Path(cfg.out) / ('swinv2.safetensors' if cfg.format == 'timm' else 'swinv2.pth')}")
    check_new_output(cfg.out, cfg.overwrite)
    overrides = OmegaConf.to_container(cfg.model)
    ckpt = read_checkpoint(cfg.checkpoint)
    if cfg.ema:
        ckpt = ema_weights(ckpt)
    elif any(key.startswith("ema.") for key in (ckpt.get("state_dict") or {})):
        print("note: the checkpoint also holds EMA weights (train.ema_decay); ema=true exports those")
    if cfg.format == "official":
        print(f"official layout: {export_official(ckpt, overrides, cfg.out)}")
        return
    if cfg.format == "hf" and has_simmim_decoder(ckpt):
        simmim, config = simmim_from_checkpoint(ckpt, overrides)
        out = export_hf(simmim, config, cfg.out, saved_simmim_config(ckpt))
        print(f"transformers folder: {out} (transformers.Swinv2ForMaskedImageModeling.from_pretrained({str(out)!r}); "
              f"Swinv2Model.from_pretrained takes its encoder)")
        if simmim.norm_target_patch_size is not None:  # transformers' MIM loss compares with the pixels themselves
            print(f"note: the decoder was trained on locally normalized targets (norm_target_patch_size="
                  f"{simmim.norm_target_patch_size}), which the loss of transformers' Swinv2ForMaskedImageModeling "
                  f"does not use")
        return
    model, config = encoder_for_export(ckpt, overrides)
    if cfg.format == "timm":
        out = export_timm(model, config, cfg.out, class_names(ckpt))
        print(f"timm state dict: {out}\nload it into timm.models.swin_transformer_v2.SwinTransformerV2("
              f"{', '.join(f'{k}={v!r}' for k, v in timm_kwargs(config).items())})")
    else:
        out = export_hf(model, config, cfg.out, names=class_names(ckpt))
        name = "Swinv2ForImageClassification" if config.get("num_classes") else "Swinv2Model"
        print(f"transformers folder: {out} (transformers.{name}.from_pretrained({str(out)!r}))")
