"""Load pretrained SwinV2 weights into a `SwinTransformerV2` for fine-tuning.

Accepted checkpoints (detected by `detect_layout`, converted to our parameter names by one function each):

- `lightning-simmim`: our pretraining checkpoint, `{"state_dict": {"simmim.encoder.*", "simmim.decoder.0.*"}}`
- `lightning-classifier`: a fine-tune module checkpoint, `{"state_dict": {"model.*", ...}}`
- `exported-simmim`: our `export_encoder` file, `{"model": {"encoder.*", "decoder.0.*"}, "config": {...}}`
- `official-simmim`: microsoft/SimMIM, `{"model": {"encoder.*", "decoder.*"}}`
- `official-swinv2`: microsoft/Swin-Transformer classification, `{"model": {plain keys, "head.*"}}`
- `timm`: a timm SwinV2 state dict (bare or under "state_dict" / "model"): patch merging at the start of the
  next stage (`layers.{i+1}.downsample`) and the classifier as `head.fc`.
"""
from __future__ import annotations

import inspect
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from simmim.swinv2 import DERIVED_BUFFERS, SwinTransformerV2

__all__ = ["LoadReport", "load_pretrained", "pretrained_window_sizes", "read_checkpoint", "detect_layout"]

# Keys a checkpoint may hold that the encoder recomputes or does not have: derived buffers, timm's constant
# zero `k_bias` buffer, SimMIM's mask token.
DROPPED_SUFFIXES = DERIVED_BUFFERS + ("k_bias", "mask_token")
HEAD_PREFIX = "head."
MISMATCH_HINT = "build the model with the pretraining config (embed_dim, depths, num_heads)"


@dataclass
class LoadReport:
    """What `load_pretrained` did, key by key (our parameter names)."""

    layout: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    reinitialized: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"pretrained weights ({self.layout} layout)"]
        for name in ("loaded", "missing", "unexpected", "reinitialized"):
            keys = getattr(self, name)
            more = f", ... (+{len(keys) - 3})" if len(keys) > 3 else ""
            lines.append(f"  {name:<13} {len(keys):>4}  {', '.join(keys[:3])}{more}".rstrip())
        return "\n".join(lines)


def read_checkpoint(source: str | Path | Mapping) -> dict:
    """A checkpoint as a dict: loaded on CPU from a path (weights only first; full unpickling for Lightning
    checkpoints whose hyperparameters hold other objects), or returned as is."""
    if isinstance(source, Mapping):
        return dict(source)
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return torch.load(source, map_location="cpu", weights_only=False)


# ------------------------------------------------------------------------------------------------ layouts
def _has_prefix(state_dict: Mapping, prefix: str) -> bool:
    return any(key.startswith(prefix) for key in state_dict)


def _strip_prefix(state_dict: Mapping, prefix: str) -> dict:
    """Keys under `prefix` with the prefix removed; all other keys are left out."""
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}


def _plain_state_dict(ckpt: Mapping) -> Mapping:
    for key in ("state_dict", "model"):
        if isinstance(ckpt.get(key), Mapping):
            return ckpt[key]
    return ckpt


def _is_timm(state_dict: Mapping) -> bool:
    """timm has no merging in stage 0 but one in the last stage; the official layout is the reverse."""
    return _has_prefix(state_dict, "head.fc.") or (
        not _has_prefix(state_dict, "layers.0.downsample.") and _has_prefix(state_dict, "layers.")
        and any(re.match(r"layers\.\d+\.downsample\.", key) for key in state_dict))


def detect_layout(ckpt: Mapping) -> str:
    """The layout name of a loaded checkpoint (see the module docstring); ValueError when none fits."""
    state_dict = ckpt.get("state_dict")
    if isinstance(state_dict, Mapping):
        if _has_prefix(state_dict, "simmim.encoder."):
            return "lightning-simmim"
        if _has_prefix(state_dict, "model.patch_embed."):
            return "lightning-classifier"
    model = ckpt.get("model")
    if isinstance(model, Mapping) and _has_prefix(model, "encoder."):
        return "exported-simmim" if isinstance(ckpt.get("config"), Mapping) else "official-simmim"
    plain = _plain_state_dict(ckpt)
    if _has_prefix(plain, "patch_embed."):
        return "timm" if _is_timm(plain) else "official-swinv2"
    raise ValueError(f"unrecognized checkpoint layout (top-level keys {list(ckpt)[:8]}); expected a SimMIM or "
                     f"fine-tune Lightning checkpoint, an exported/official SimMIM file, an official SwinV2 "
                     f"checkpoint or a timm SwinV2 state dict")


def _from_lightning_simmim(ckpt: Mapping) -> dict:
    return _strip_prefix(ckpt["state_dict"], "simmim.encoder.")


def _from_lightning_classifier(ckpt: Mapping) -> dict:
    return _strip_prefix(ckpt["state_dict"], "model.")


def _from_simmim(ckpt: Mapping) -> dict:
    return _strip_prefix(ckpt["model"], "encoder.")


def _from_official_swinv2(ckpt: Mapping) -> dict:
    return dict(_plain_state_dict(ckpt))


def _from_timm(ckpt: Mapping) -> dict:
    """timm `layers.{i+1}.downsample.*` -> `layers.{i}.downsample.*`, `head.fc.*` -> `head.*`."""
    converted = {}
    for key, value in _plain_state_dict(ckpt).items():
        key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m[1]) - 1}.downsample.", key)
        converted[re.sub(r"^head\.fc\.", HEAD_PREFIX, key)] = value
    return converted


CONVERTERS = {
    "lightning-simmim": _from_lightning_simmim,
    "lightning-classifier": _from_lightning_classifier,
    "exported-simmim": _from_simmim,
    "official-simmim": _from_simmim,
    "official-swinv2": _from_official_swinv2,
    "timm": _from_timm,
}


# ------------------------------------------------------------------------------------------------ loading
def _shape_error(key: str, ours: torch.Size, theirs: torch.Size) -> ValueError:
    return ValueError(f"checkpoint does not match the model: {key} is {tuple(theirs)} in the checkpoint but "
                      f"{tuple(ours)} in the model; {MISMATCH_HINT}")


def load_pretrained(model: SwinTransformerV2, source: str | Path | Mapping, strict: bool = True) -> LoadReport:
    """Load encoder weights from any layout above into `model`, in place.

    Derived buffers, the mask token and the decoder are dropped; a head whose shape differs from the model's
    is left as initialized (`reinitialized`). A shape mismatch outside the head raises ValueError naming the
    first such key; with `strict`, so do missing or unexpected keys outside the head.
    """
    ckpt = read_checkpoint(source)
    layout = detect_layout(ckpt)
    weights = {key: value for key, value in CONVERTERS[layout](ckpt).items()
               if not key.endswith(DROPPED_SUFFIXES)}
    target = model.state_dict()
    report = LoadReport(layout)
    usable = {}
    for key, ours in target.items():
        is_head = key.startswith(HEAD_PREFIX)
        if key not in weights:
            (report.reinitialized if is_head else report.missing).append(key)
        elif weights[key].shape == ours.shape:
            usable[key] = weights[key]
        elif is_head:
            report.reinitialized.append(key)
        else:
            raise _shape_error(key, ours.shape, weights[key].shape)
    report.unexpected = [key for key in weights if key not in target and not key.startswith(HEAD_PREFIX)]
    if strict and (report.missing or report.unexpected):
        raise ValueError(f"checkpoint does not match the model: {len(report.missing)} missing keys "
                         f"{report.missing[:3]}, {len(report.unexpected)} unexpected keys {report.unexpected[:3]}; "
                         f"{MISMATCH_HINT}")
    model.load_state_dict(usable, strict=False)
    report.loaded = list(usable)
    return report


def pretrained_window_sizes(source: str | Path | Mapping) -> list[int] | None:
    """Per stage, the window the pretrained encoder actually used, min(window_size, img_size / patch / 2^i),
    from the config our checkpoints carry (e.g. 192 px, patch 4, window 12 -> [12, 12, 12, 6]); None for
    checkpoints without one (official, timm), whose windows must be set by hand."""
    ckpt = read_checkpoint(source)
    holder = ckpt.get("hyper_parameters") if "state_dict" in ckpt else ckpt.get("config")
    config = holder.get("model") if isinstance(holder, Mapping) else None
    if not isinstance(config, Mapping):
        return None
    defaults = {name: p.default for name, p in inspect.signature(SwinTransformerV2).parameters.items()}
    cfg = {**defaults, **config}
    resolution = cfg["img_size"] // cfg["patch_size"]
    return [min(cfg["window_size"], resolution // 2 ** i) for i in range(len(cfg["depths"]))]
