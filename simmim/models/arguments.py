"""SwinTransformerV2 arguments from a `model` section (a recipe's, a checkpoint's saved config, a tool's options):
the paper's variants filled in, null keeping a value, keys that are no arguments dropped."""
from __future__ import annotations

import inspect
from collections.abc import Mapping

from omegaconf import ListConfig

from simmim.errors import ConfigError
from simmim.models.swinv2 import VARIANTS, SwinTransformerV2


def variant_model(variant: str) -> dict:
    """The paper's widths, depths and heads of a variant, as a `model` section (lists, not tuples)."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown model.variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in VARIANTS[variant].items()}


def model_section() -> dict:
    """A `model` section naming `variant` and every SwinTransformerV2 argument, all null: the schema of the tool
    scripts, whose model comes from a checkpoint or a recipe and where null keeps that value."""
    return {"variant": None, **dict.fromkeys(model_defaults())}


def model_defaults() -> dict:
    """SwinTransformerV2's arguments but norm_layer, with their defaults: {"img_size": 224, "depths": (2, 2, 6, 2),
    ...}."""
    return {name: p.default for name, p in inspect.signature(SwinTransformerV2).parameters.items()
            if name != "norm_layer"}


def resolve_model(base: Mapping, overrides: Mapping) -> dict:
    """SwinTransformerV2 arguments: base (a recipe's or checkpoint's model section) <- the widths, depths and heads
    of overrides["variant"] <- the other non-null overrides. Keys that are not arguments (variant) are dropped."""
    names = set(model_section()) - {"variant"}
    variant = overrides.get("variant")
    merged = {**base, **(variant_model(variant) if variant else {}),
              **{k: v for k, v in overrides.items() if v is not None and k != "variant"}}
    return {k: list(v) if isinstance(v, (tuple, ListConfig)) else v for k, v in merged.items() if k in names}
