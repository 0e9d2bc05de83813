"""Load pretrained SwinV2 weights into a `SwinTransformerV2` for fine-tuning.

Accepted checkpoints (detected by `detect_layout`, converted to our parameter names by one function each):

- `lightning-simmim`: our pretraining checkpoint, `{"state_dict": {"simmim.encoder.*", "simmim.decoder.0.*"}}`
- `lightning-classifier`: a fine-tune module checkpoint, `{"state_dict": {"model.*", ...}}`
- `exported-simmim`: our `export_encoder` file, `{"model": {"encoder.*", "decoder.0.*"}, "config": {...}}`
- `official-simmim`: microsoft/SimMIM, `{"model": {"encoder.*", "decoder.*"}}`
- `official-swinv2`: microsoft/Swin-Transformer classification, `{"model": {plain keys, "head.*"}}`
- `timm`: a timm SwinV2 state dict (bare or under "state_dict" / "model"): patch merging at the start of the
  next stage (`layers.{i+1}.downsample`) and the classifier as `head.fc`; also a timm Hub folder (config.json
  naming the `architecture`, model.safetensors or pytorch_model.bin: `timm_folder_model`).
- `hf`: transformers' Swinv2 (`Swinv2Model`, `Swinv2ForImageClassification`, `Swinv2ForMaskedImageModeling`):
  a folder as `save_pretrained` writes it (config.json, model.safetensors or pytorch_model.bin, also sharded;
  the model arguments come from config.json), or its state dict alone. The masked-image-modeling model is a
  SimMIM checkpoint too: its mask token and decoder (`decoder.0`, SimMIM's) are read by `simmim_from_checkpoint`.

Each can also be a `.safetensors` file (bare state dicts, e.g. timm's or `scripts/export.py format=timm`).
`encoder_from_checkpoint` and `simmim_from_checkpoint` build the model a checkpoint holds (from the config our
checkpoints carry, with overrides) and load it, for tools that use a checkpoint as it is.
"""
from __future__ import annotations

import json
import math
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from simmim.errors import ConfigError
from simmim.models.arguments import model_defaults, resolve_model, variant_model
from simmim.models.simmim import SimMIM, build_simmim
from simmim.models.swinv2 import DERIVED_BUFFERS, VARIANTS, SwinTransformerV2

__all__ = ["LoadReport", "a_layout", "load_pretrained", "load_weights", "resize_position_bias_table",
           "pretrained_window_sizes", "read_checkpoint", "read_safetensors", "checkpoint_weights", "detect_layout",
           "saved_model_config", "saved_simmim_config", "model_config", "encoder_from_checkpoint",
           "simmim_from_checkpoint", "SIMMIM_LAYOUTS", "HF_DECODER", "ema_weights", "check_weights_meaning",
           "stage_windows", "has_simmim_decoder", "HF_CONFIG", "hf_key", "read_hf_folder", "class_names",
           "timm_folder_model", "weights_model"]

# Keys a checkpoint may hold that the encoder recomputes or does not have: derived buffers, timm's constant
# zero `k_bias` buffer, SimMIM's mask token.
DROPPED_SUFFIXES = DERIVED_BUFFERS + ("k_bias", "mask_token")
HEAD_PREFIX = "head."
TABLE_SUFFIX = "relative_position_bias_table"
MISMATCH_HINT = "build the model with the pretraining config (embed_dim, depths, num_heads)"


@dataclass
class LoadReport:
    """What `load_pretrained` did, key by key (our parameter names)."""

    layout: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    reinitialized: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)  # V1 bias tables resized to the model's window (also loaded)

    def __str__(self) -> str:
        lines = [f"pretrained weights ({self.layout} layout)"]
        for name in ("loaded", "missing", "unexpected", "reinitialized", "resized"):
            keys = getattr(self, name)
            more = f", ... (+{len(keys) - 3})" if len(keys) > 3 else ""
            lines.append(f"  {name:<13} {len(keys):>4}  {', '.join(keys[:3])}{more}".rstrip())
        return "\n".join(lines)


def read_checkpoint(source: str | Path | Mapping) -> dict:
    """A checkpoint as a dict: loaded on CPU from a path (weights only first; full unpickling for Lightning
    checkpoints whose hyperparameters hold other objects; `.safetensors` files by `read_safetensors`,
    transformers folders by `read_hf_folder`), or returned as is."""
    if isinstance(source, Mapping):
        return dict(source)
    if (Path(source) / "config.json").is_file():
        return read_hf_folder(source)
    if not Path(source).is_file():
        what = "is a folder without config.json" if Path(source).is_dir() else "does not exist"
        raise FileNotFoundError(f"checkpoint {source} {what}; pass the path of a .ckpt, .pth or .safetensors file "
                                f"or of a transformers Swinv2 folder")
    if Path(source).suffix == ".safetensors":
        return read_safetensors(source)
    try:
        try:
            ckpt = torch.load(source, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            ckpt = torch.load(source, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated zip (OSError, RuntimeError), bad pickle (KeyError, EOFError, ...)
        if _looks_like_safetensors(source):
            raise ValueError(f"{source} is a safetensors file named {Path(source).suffix or 'without a suffix'}; "
                             f"rename it to {Path(source).with_suffix('.safetensors').name}") from None
        reason = str(error).splitlines()[0] if str(error) else ""
        raise ValueError(f"cannot read {source} as a PyTorch checkpoint ({type(error).__name__}: {reason}); pass a "
                         f"file written by torch.save, whole") from None
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{source} holds a {type(ckpt).__name__}, not a checkpoint dict; pass a state dict or a "
                         f"training checkpoint")
    return ckpt


def _looks_like_safetensors(path: str | Path) -> bool:
    """A safetensors file starts with the 8-byte little-endian length of its JSON header, then the header's '{'."""
    with open(path, "rb") as file:
        head = file.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < Path(path).stat().st_size


def read_safetensors(path: str | Path) -> dict:
    """A `.safetensors` state dict (any layout below, e.g. timm's) as a checkpoint dict: the bare tensors, or
    `{"model": tensors, "config": ...}` when its metadata holds our config (scripts/export.py writes it)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            tensors = {key: file.get_tensor(key) for key in file.keys()}
            metadata = file.metadata() or {}
    except (SafetensorError, OSError) as error:
        if Path(path).read_bytes()[:2] == b"PK":  # a zip: what torch.save writes
            raise ValueError(f"{path} is a torch.save file named .safetensors; rename it to "
                             f"{Path(path).with_suffix('.pth').name}") from None
        raise ValueError(f"cannot read {path} as safetensors ({error}); pass a file written by "
                         f"safetensors.torch.save_file") from error
    if "config" in metadata:
        return {"model": tensors, "config": json.loads(metadata["config"])}
    return tensors


# ------------------------------------------------------------------------------------------ transformers
HF_BLOCK = {  # our names inside a block -> transformers' Swinv2Layer names
    "norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
    "attn.logit_scale": "attention.self.logit_scale", "attn.cpb_mlp": "attention.self.continuous_position_bias_mlp",
    "attn.q_bias": "attention.self.query.bias", "attn.v_bias": "attention.self.value.bias",
    "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
}
HF_TOP = {"patch_embed.proj": "embeddings.patch_embeddings.projection", "patch_embed.norm": "embeddings.norm",
          "norm": "layernorm", "mask_token": "embeddings.mask_token"}
HF_CONFIG = {  # our SwinTransformerV2 arguments -> transformers' Swinv2Config keys
    "img_size": "image_size", "patch_size": "patch_size", "in_chans": "num_channels", "embed_dim": "embed_dim",
    "depths": "depths", "num_heads": "num_heads", "window_size": "window_size",
    "pretrained_window_sizes": "pretrained_window_sizes", "mlp_ratio": "mlp_ratio", "qkv_bias": "qkv_bias",
    "drop_rate": "hidden_dropout_prob", "attn_drop_rate": "attention_probs_dropout_prob",
    "drop_path_rate": "drop_path_rate",
}


def _swap(name: str, pairs) -> str | None:
    """`name` with the first prefix of `pairs` ((from, to): whole name or up to a dot) replaced; None if none fits."""
    for old, new in pairs:
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
    return None


def hf_key(key: str) -> str:
    """Our encoder parameter name -> transformers' `Swinv2Model` name (the fused qkv weight aside)."""
    block = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)$", key)
    if block:
        rest = _swap(block[3], HF_BLOCK.items())
        name = rest and f"encoder.layers.{block[1]}.blocks.{block[2]}.{rest}"
    else:  # layers.{i}.downsample.*: merging at the end of a stage, as ours
        name = "encoder." + key if key.startswith("layers.") else _swap(key, HF_TOP.items())
    if name is None:
        raise ValueError(f"no transformers Swinv2 parameter for {key}; export format=official instead")
    return name


def _key_from_hf(key: str) -> str:
    """transformers' `Swinv2Model` name -> ours (`hf_key` backwards); other names are returned as they are."""
    block = re.match(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)$", key)
    if block:
        rest = _swap(block[3], [(theirs, ours) for ours, theirs in HF_BLOCK.items()])
        return f"layers.{block[1]}.blocks.{block[2]}.{rest}" if rest else key
    if key.startswith("encoder.layers."):
        return key.removeprefix("encoder.")
    return _swap(key, [(theirs, ours) for ours, theirs in HF_TOP.items()]) or key


def read_hf_folder(folder: str | Path) -> dict:
    """A transformers Swinv2 folder (config.json, weights: `_hf_weights`) as `{"model": its state
    dict, "config": {"model": our SwinTransformerV2 arguments from config.json, "simmim": its masking settings when
    it has them (scripts/export.py writes them)}}`; a timm Hub folder's (its config.json names an `architecture`)
    model comes from `timm_folder_model`."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except ValueError as error:
        raise ValueError(f"cannot read {folder / 'config.json'} ({error}); pass a folder written by "
                         f"transformers' save_pretrained") from None
    if isinstance(config, dict) and "architecture" in config and "model_type" not in config:
        return {"model": _hf_weights(folder), "config": {"model": timm_folder_model(config, folder / "config.json")}}
    if not isinstance(config, dict) or config.get("model_type") != "swinv2":
        found = config.get("model_type") if isinstance(config, dict) else None
        raise ValueError(f"{folder / 'config.json'} has model_type {found!r}; pass a transformers "
                         f"Swinv2 folder (model_type swinv2)")
    if config.get("use_absolute_embeddings"):
        raise ValueError(f"{folder / 'config.json'} has use_absolute_embeddings=true, which SwinV2 does not use and "
                         f"this encoder does not read")
    for name, ours in (("hidden_act", "gelu"), ("layer_norm_eps", 1e-5)):  # fixed in this encoder
        if config.get(name, ours) != ours:
            raise ValueError(f"{folder / 'config.json'} has {name}={config[name]!r}; this encoder has {ours} only (its "
                             f"outputs would differ)")
    weights = _hf_weights(folder)
    model = {ours: config[theirs] for ours, theirs in HF_CONFIG.items() if theirs in config}
    if not any(model.get("pretrained_window_sizes") or []):  # zeros: the windows it was trained with (model_config)
        model.pop("pretrained_window_sizes", None)
    simmim = config.get("simmim")  # masking settings, as scripts/export.py writes them for a SimMIM model
    labels = config.get("id2label") or {}
    names = [str(labels.get(str(i), labels.get(i, ""))) for i in range(len(labels))]
    named = names and not all(name == f"LABEL_{i}" for i, name in enumerate(names))  # transformers' defaults
    return {"model": weights, "config": {"model": model, **({"simmim": simmim} if isinstance(simmim, dict) else {}),
                                         **({"class_names": names} if named else {})}}


TIMM_ARCHITECTURE = re.compile(r"swinv2_(tiny|small|base|large)_window(\d+)(?:to(\d+))?_(\d+)(?:to(\d+))?$")
TIMM_MODEL_ARGS = ("img_size", "patch_size", "in_chans", "embed_dim", "depths", "num_heads", "window_size",
                   "mlp_ratio", "qkv_bias", "pretrained_window_sizes")  # timm's names, the same as ours


def timm_folder_model(config: Mapping, where: Path | str = "config.json") -> dict:
    """Our SwinTransformerV2 arguments for a timm Hub folder's config.json: the paper size, window and image size
    its `architecture` names (swinv2_base_window12to16_192to256: base at window 16 and 256 px, pretrained at window
    12 and 192 px, so its CPB windows are [12, 12, 12, 6]), the input size of its `pretrained_cfg`, its
    `num_classes`, then its `model_args` (newer timm writes the arguments the model was built with)."""
    name = str(config["architecture"])
    match = TIMM_ARCHITECTURE.match(name)
    if match is None:
        raise ValueError(f"{where} is a timm model folder of architecture {name!r}; only timm's swinv2_{{tiny,small,"
                         f"base,large}}_window* models are this SwinV2 (swinv2_cr_* is another design)")
    variant, window, window_to, size, size_to = match.groups()
    input_size = (config.get("pretrained_cfg") or {}).get("input_size") or [int(size_to or size)]
    model = {**variant_model(variant), "img_size": int(input_size[-1]), "window_size": int(window_to or window),
             "num_classes": int(config.get("num_classes", 0))}
    if window_to:
        model["pretrained_window_sizes"] = stage_windows({**model, "img_size": int(size), "window_size": int(window)})
    model.update({key: value for key, value in (config.get("model_args") or {}).items() if key in TIMM_MODEL_ARGS})
    if not any(model.get("pretrained_window_sizes") or []):  # timm's zeros: the windows it runs at
        model.pop("pretrained_window_sizes", None)
    return model


def _hf_weights(folder: Path) -> dict:
    """The state dict of a transformers folder: model.safetensors or pytorch_model.bin, whole or in the shards
    that its `.index.json` lists."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return read_checkpoint(folder / name)
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                raise ValueError(f"cannot read {index} ({type(error).__name__}: {error}); pass a folder written by "
                                 f"transformers' save_pretrained") from None
            return {key: value for shard in shards for key, value in read_checkpoint(folder / shard).items()}
    raise FileNotFoundError(f"{folder} has no model.safetensors or pytorch_model.bin (nor their .index.json); pass "
                            f"a folder written by transformers' save_pretrained")


def _is_hf(state_dict: Mapping) -> bool:
    return any(key.endswith("embeddings.patch_embeddings.projection.weight") for key in state_dict)


def _from_hf(ckpt: Mapping) -> dict:
    """transformers' names -> ours: `swinv2.` dropped, query / key / value weights fused into qkv, the classifier
    as `head.*`, the MIM mask token as `mask_token`; the MIM decoder and the buffers transformers keeps are left
    out."""
    plain = _plain_state_dict(ckpt)
    prefix = "swinv2." if _has_prefix(plain, "swinv2.") else ""
    converted, qkv = {}, {}
    for key, value in plain.items():
        if key.startswith("classifier."):
            converted[HEAD_PREFIX + key.removeprefix("classifier.")] = value
        elif not key.startswith(prefix) or key.startswith("decoder."):  # Swinv2ForMaskedImageModeling's decoder
            continue
        elif key.endswith(("relative_coords_table", "relative_position_index")):
            continue
        elif attn := re.match(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.self\.(query|key|value)\.weight$",
                              key[len(prefix):]):
            qkv.setdefault(f"layers.{attn[1]}.blocks.{attn[2]}.", {})[attn[3]] = value
        else:
            converted[_key_from_hf(key[len(prefix):])] = value
    for block, parts in qkv.items():
        converted[block + "attn.qkv.weight"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return converted


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
    if _is_hf(_plain_state_dict(ckpt)):
        return "hf"
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
                     f"checkpoint, a timm SwinV2 state dict or a transformers Swinv2 folder")


def _from_lightning_simmim(ckpt: Mapping) -> dict:
    return _strip_prefix(ckpt["state_dict"], "simmim.encoder.")


def ema_weights(ckpt: Mapping) -> dict:
    """A fine-tuning checkpoint with its EMA weights (`ema.*`, train.ema_decay) in place of the live ones
    (`model.*`), which every reader takes; ValueError when it holds none."""
    state = ckpt.get("state_dict") if isinstance(ckpt.get("state_dict"), Mapping) else {}
    ema = {key: value for key, value in state.items() if key.startswith("ema.")}
    if not ema:
        raise ValueError("the checkpoint holds no EMA weights (ema.*: a fine-tuning run with train.ema_decay set); "
                         "drop ema=true")
    return {**ckpt, "state_dict": {"model." + key.removeprefix("ema."): value for key, value in ema.items()}}


def _from_lightning_classifier(ckpt: Mapping) -> dict:
    return _fold_probe_head(_strip_prefix(ckpt["state_dict"], "model."))


PROBE_BN_EPS = 1e-6  # the eps of a linear probe's BatchNorm1d (finetune.module.SwinV2Classifier)


def _fold_probe_head(weights: dict) -> dict:
    """A linear probe's head, BatchNorm1d without affine then Linear (`head.0`, `head.1`), as the one Linear it
    computes in eval mode (`head.weight`, `head.bias`, as every other layout's head): W / s and b - W mu / s, with
    s = sqrt(running_var + eps)."""
    if "head.1.weight" not in weights or "head.0.running_var" not in weights:
        return weights
    linear = weights["head.1.weight"]
    scale = (weights["head.0.running_var"].double() + PROBE_BN_EPS).rsqrt()
    weight = linear.double() * scale
    bias = weights["head.1.bias"].double() - weight @ weights["head.0.running_mean"].double()
    return {**{key: value for key, value in weights.items() if not key.startswith("head.")},
            "head.weight": weight.to(linear.dtype), "head.bias": bias.to(linear.dtype)}


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
    "hf": _from_hf,
}


def a_layout(layout: str) -> str:
    """A layout's name as a message writes it: 'an exported-simmim checkpoint', 'a timm checkpoint'."""
    return f"{'an' if layout[0] in 'aeiou' else 'a'} {layout} checkpoint"


def checkpoint_weights(ckpt: Mapping, layout: str | None = None) -> dict:
    """The encoder weights (and classifier head, where there is one) of a loaded checkpoint of any layout above
    (`detect_layout`'s, unless given), under our parameter names; derived buffers, the mask token and the decoder
    are left out."""
    return {key: value for key, value in CONVERTERS[layout or detect_layout(ckpt)](ckpt).items()
            if not key.endswith(DROPPED_SUFFIXES)}


# ------------------------------------------------------------------------------------------------ loading
def _shape_error(key: str, ours: torch.Size, theirs: torch.Size, hint: str = MISMATCH_HINT) -> ValueError:
    return ValueError(f"checkpoint does not match the model: {key} is {tuple(theirs)} in the checkpoint but "
                      f"{tuple(ours)} in the model; {hint}")


def _keys_error(missing: list[str], unexpected: list[str], hint: str = MISMATCH_HINT) -> ValueError:
    return ValueError(f"checkpoint does not match the model: {len(missing)} missing keys {missing[:3]}, "
                      f"{len(unexpected)} unexpected keys {unexpected[:3]}; {hint}")


def weights_model(weights: Mapping) -> dict:
    """What a SwinV2 state dict (our names) says of its model's arguments: embed_dim, in_chans and patch_size (the
    patch embedding), depths (blocks per stage), attn_mode (cosine attention has a logit scale) and num_heads (per
    stage, from its first block's attention)."""
    found = {}
    proj = weights.get("patch_embed.proj.weight")
    if proj is not None and proj.dim() == 4:
        found.update(embed_dim=proj.shape[0], in_chans=proj.shape[1], patch_size=proj.shape[2])
    blocks: dict[int, int] = {}
    for key in weights:
        if match := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", key):
            blocks[int(match[1])] = max(blocks.get(int(match[1]), 0), int(match[2]) + 1)
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        return found
    found["depths"] = [blocks[i] for i in range(len(blocks))]
    found["attn_mode"] = "cosine" if any(key.endswith("attn.logit_scale") for key in weights) else "dot"
    heads = []
    for i in range(len(blocks)):
        attn = f"layers.{i}.blocks.0.attn."
        heads += [weights[attn + name].shape[axis] for name, axis in HEADS_AXIS if attn + name in weights][:1]
    if len(heads) == len(blocks):
        found["num_heads"] = heads
    return found


HEADS_AXIS = (("logit_scale", 0), ("cpb_mlp.2.weight", 0), ("relative_position_bias_table", 1))  # where heads show


def mismatch_hint(weights: Mapping, target: Mapping) -> str:
    """The fix for weights that do not fit a model: the arguments the checkpoint's weights hold and the model's
    differ in (`weights_model`), with the paper size they make; the generic hint when they agree."""
    theirs, ours = weights_model(weights), weights_model(target)
    differ = [f"model.{key}={theirs[key]} (this model: {ours[key]})" for key in theirs
              if key in ours and theirs[key] != ours[key]]
    if not differ:
        return MISMATCH_HINT
    variant = next((name for name, args in VARIANTS.items() if all(
        theirs.get(key) == (list(value) if isinstance(value, tuple) else value) for key, value in args.items()
        if key in ("embed_dim", "depths", "num_heads"))), None)
    return (f"the checkpoint's weights are of {', '.join(differ)}; set "
            + (f"model.variant={variant}" if variant else "those"))


def load_pretrained(model: SwinTransformerV2, source: str | Path | Mapping, strict: bool = True) -> LoadReport:
    """Load encoder weights from any layout above into `model`, in place.

    Derived buffers, the mask token and the decoder are dropped; a head whose shape differs from the model's
    is left as initialized (`reinitialized`); a V1 position-bias table of another window is resized to the
    model's by `resize_position_bias_table` (`resized`). Any other shape mismatch raises ValueError naming the
    first such key; with `strict`, so do missing or unexpected keys outside the head.
    """
    ckpt = read_checkpoint(source)
    layout = detect_layout(ckpt)
    return load_weights(model, checkpoint_weights(ckpt, layout), layout, strict)


def load_weights(model: SwinTransformerV2, weights: Mapping, layout: str, strict: bool = True) -> LoadReport:
    """`load_pretrained` of weights already converted (`checkpoint_weights`) from a checkpoint of `layout`."""
    target = model.state_dict()
    report = LoadReport(layout)
    usable = {}
    for key, ours in target.items():
        is_head = key.startswith(HEAD_PREFIX)
        if key not in weights:
            (report.reinitialized if is_head else report.missing).append(key)
        elif weights[key].shape == ours.shape:
            usable[key] = weights[key]
        elif key.endswith(TABLE_SUFFIX) and weights[key].shape[1:] == ours.shape[1:]:
            usable[key] = resize_position_bias_table(weights[key], (math.isqrt(ours.shape[0]) + 1) // 2)
            report.resized.append(key)
        elif is_head:
            report.reinitialized.append(key)
        else:
            raise _shape_error(key, ours.shape, weights[key].shape, mismatch_hint(weights, target))
    report.unexpected = [key for key in weights if key not in target and not key.startswith(HEAD_PREFIX)]
    if strict and (report.missing or report.unexpected):
        raise _keys_error(report.missing, report.unexpected, mismatch_hint(weights, target))
    model.load_state_dict(usable, strict=False)
    report.loaded = list(usable)
    return report


def resize_position_bias_table(table: torch.Tensor, window_size: int) -> torch.Tensor:
    """A V1 relative position bias table of window W, ((2W-1)^2, heads), resized bicubically as one
    (2W-1) x (2W-1) picture per head to window `window_size` W': ((2W'-1)^2, heads), as Swin V1 does when the
    window changes. The zero offset stays at the center and keeps its value."""
    side, heads = math.isqrt(table.shape[0]), table.shape[1]
    if side * side != table.shape[0] or side % 2 == 0:
        raise ValueError(f"a position bias table has (2W-1)^2 rows, got {table.shape[0]}; pass a "
                         f"relative_position_bias_table of a square window")
    grid = table.detach().float().T.reshape(1, heads, side, side)
    new_side = 2 * window_size - 1
    resized = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    return resized.reshape(heads, new_side * new_side).T.contiguous().to(table.dtype)


def pretrained_window_sizes(source: str | Path | Mapping) -> list[int] | None:
    """Per stage, the windows that scale the CPB coordinates of the saved encoder: its own
    `pretrained_window_sizes` when it was itself built from pretrained windows (a fine-tuned classifier keeps
    the scale its bias MLP learned), else the window it used, min(window_size, img_size / patch / 2^i), from
    the config our checkpoints carry (e.g. 192 px, patch 4, window 12 -> [12, 12, 12, 6]); None for checkpoints
    without one (official, timm), whose windows must be set by hand."""
    config = saved_model_config(read_checkpoint(source))
    if config is None:
        return None
    if any(config.get("pretrained_window_sizes") or []):
        return list(config["pretrained_window_sizes"])
    return stage_windows(config)


def stage_windows(config: Mapping) -> list[int]:
    """The window each stage of a SwinTransformerV2 of these arguments uses: min(window_size, img_size / patch /
    2^i), the stage's map when it is smaller."""
    cfg = {**model_defaults(), **config}
    resolution = cfg["img_size"] // cfg["patch_size"]
    return [min(cfg["window_size"], resolution // 2 ** i) for i in range(len(cfg["depths"]))]


# ------------------------------------------------------------------------------------------------ models
SIMMIM_LAYOUTS = ("lightning-simmim", "exported-simmim", "official-simmim")  # our layouts with a decoder
HF_DECODER = "decoder.0."  # transformers' Swinv2ForMaskedImageModeling: the SimMIM decoder, under the same name


def has_simmim_decoder(ckpt: Mapping) -> bool:
    """Whether a loaded checkpoint is a SimMIM pretraining one (encoder, mask token and decoder): our layouts
    (`SIMMIM_LAYOUTS`) and transformers' Swinv2ForMaskedImageModeling."""
    layout = detect_layout(ckpt)
    return layout in SIMMIM_LAYOUTS or layout == "hf" and _has_prefix(_plain_state_dict(ckpt), HF_DECODER)


def saved_model_config(ckpt: Mapping) -> dict | None:
    """The `model` section (SwinTransformerV2 arguments) our checkpoints carry: Lightning
    `hyper_parameters.model`, exported `config.model`; None for checkpoints without one (official, timm)."""
    holder = ckpt.get("hyper_parameters") if "state_dict" in ckpt else ckpt.get("config")
    config = holder.get("model") if isinstance(holder, Mapping) else None
    return dict(config) if isinstance(config, Mapping) else None


def class_names(ckpt: Mapping) -> list[str]:
    """Label i's class name where a checkpoint records them: a fine-tuning run on class folders (`class_names`),
    our exports (`config.class_names`), a transformers folder's id2label; [] otherwise."""
    config = ckpt.get("config")
    names = ckpt.get("class_names") or (config.get("class_names") if isinstance(config, Mapping) else None)
    return [str(name) for name in names or []]


def saved_simmim_config(ckpt: Mapping) -> dict:
    """What our pretraining checkpoints record of SimMIM: `mask_patch_size`, `mask_ratio`, `mask_kind`,
    `norm_target_patch_size`, where known (exported `config.simmim`; Lightning: the module's and the
    datamodule's hyperparameters). Empty for other checkpoints."""
    config = ckpt.get("config")
    if isinstance(config, Mapping) and isinstance(config.get("simmim"), Mapping):
        return dict(config["simmim"])
    found = {**(ckpt.get("datamodule_hyper_parameters") or {}), **(ckpt.get("hyper_parameters") or {})}
    keys = ("mask_patch_size", "mask_ratio", "mask_kind", "norm_target_patch_size")
    return {key: found[key] for key in keys if key in found}


WEIGHTS_MEANING = ("norm_mode", "position_bias")  # model keys that change what the same weights compute (log_cpb
# and linear_cpb have the same bias MLP)


def check_weights_meaning(ckpt: Mapping, model: Mapping, source: str, fix: str) -> None:
    """ConfigError when `model` (SwinTransformerV2 arguments; None leaves a key to the checkpoint) sets a key of
    `WEIGHTS_MEANING` otherwise than the checkpoint's saved config: same shapes, another computation, so the weights
    would load without an error. `source` names the checkpoint; `fix` the way out, with {key} and {trained}."""
    saved = saved_model_config(ckpt) or {}
    for key in WEIGHTS_MEANING if saved else ():
        trained, given = saved.get(key, model_defaults()[key]), model.get(key)
        if given is not None and given != trained:
            raise ConfigError(f"model.{key}={given}: {source} was trained with {key}={trained}, and its weights load "
                              f"into a {given} model without an error but do not mean the same; "
                              f"{fix.format(key=key, trained=trained)}")


def model_config(ckpt: Mapping, overrides: Mapping | None = None) -> dict:
    """SwinTransformerV2 arguments for a checkpoint: its saved model config (constructor defaults for
    checkpoints without one) <- `overrides` (a model section: `variant`, then non-null keys). When no
    `pretrained_window_sizes` results, the windows the checkpoint was trained with are filled in, so an
    override of window_size or img_size transfers the Log-CPB as fine-tuning does. An override of a key in
    `WEIGHTS_MEANING` against the saved config is a ConfigError (`check_weights_meaning`)."""
    check_weights_meaning(ckpt, overrides or {}, "the checkpoint", "drop model.{key}")
    config = resolve_model(saved_model_config(ckpt) or {}, overrides or {})
    if config.get("pretrained_window_sizes") is None:
        config["pretrained_window_sizes"] = pretrained_window_sizes(ckpt)
        if config["pretrained_window_sizes"] is None:  # official and timm files carry no config
            warnings.warn("the checkpoint does not say which windows scale its CPB coordinates; if it was pretrained "
                          "at other windows than it runs at, give them as model.pretrained_window_sizes=[...] (e.g. "
                          "[12,12,12,6] for 192 px / window 12)", stacklevel=2)
    return config


def encoder_from_checkpoint(source: str | Path | Mapping,
                            overrides: Mapping | None = None) -> tuple[SwinTransformerV2, dict, LoadReport]:
    """(encoder without head, its arguments, load report) for a checkpoint of any layout above, built by
    `model_config`; ValueError naming the first key when the weights do not fit."""
    ckpt = read_checkpoint(source)
    config = {**model_config(ckpt, overrides), "num_classes": 0}
    model = SwinTransformerV2(**config)
    return model, config, load_pretrained(model, ckpt)


def simmim_from_checkpoint(source: str | Path | Mapping, overrides: Mapping | None = None) -> tuple[SimMIM, dict]:
    """(SimMIM with encoder, mask token and decoder loaded, its model arguments) from a pretraining checkpoint
    (`has_simmim_decoder`); the saved `norm_target_patch_size` is kept. ValueError for checkpoints without a
    decoder and for weights that do not fit."""
    ckpt = read_checkpoint(source)
    layout = detect_layout(ckpt)
    if not has_simmim_decoder(ckpt):
        raise ValueError(f"{a_layout(layout)} has no SimMIM decoder; pass a pretraining checkpoint (our .ckpt "
                         f"or encoder.pth, an official SimMIM file or a transformers Swinv2ForMaskedImageModeling)")
    config = model_config(ckpt, overrides)
    simmim = build_simmim(config, saved_simmim_config(ckpt).get("norm_target_patch_size"))
    if layout == "lightning-simmim":
        weights = _strip_prefix(ckpt["state_dict"], "simmim.")
    elif layout == "hf":
        weights = {**{"encoder." + key: value for key, value in _from_hf(ckpt).items()},
                   **{key: value for key, value in _plain_state_dict(ckpt).items() if key.startswith(HF_DECODER)}}
    else:
        weights = ckpt["model"]
    target = simmim.state_dict()
    hint = partial(mismatch_hint, _strip_prefix(weights, "encoder."), _strip_prefix(target, "encoder."))
    for key, value in weights.items():
        if key in target and value.shape != target[key].shape:
            raise _shape_error(key, target[key].shape, value.shape, hint())
    result = simmim.load_state_dict(weights, strict=False)  # derived buffers are dropped by the encoder's hook
    if result.missing_keys or result.unexpected_keys:
        raise _keys_error(result.missing_keys, result.unexpected_keys, hint())
    return simmim, config
