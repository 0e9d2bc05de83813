"""The ablation recipes (the paper's Table 6 and Table 1 rows at small scale): each resolves, builds the ablated
model, and differs from the default fine-tune only in what it ablates, in training from scratch, and in its name."""
import pytest
import torch
from omegaconf import OmegaConf

from finetune.module import SwinV2Classifier
from simmim.train.config import available_recipes, load_config

ABLATIONS = {
    "ablation_pre_norm": {"model.norm_mode": "pre_norm"},
    "ablation_dot_attention": {"model.attn_mode": "dot"},
    "ablation_linear_cpb": {"model.position_bias": "linear_cpb"},
    "ablation_table_bias": {"model.position_bias": "table"},
}


def flat(node: dict, prefix: str = "") -> dict:
    """{"section.key": value} for every leaf of a config container."""
    leaves = {}
    for key, value in node.items():
        if isinstance(value, dict):
            leaves.update(flat(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def test_every_ablation_recipe_is_covered():
    assert {name for name in available_recipes("finetune") if name.startswith("ablation_")} == set(ABLATIONS)


@pytest.mark.parametrize("name", ABLATIONS)
def test_differs_from_the_default_only_in_the_ablated_keys(name):
    default = flat(OmegaConf.to_container(load_config("finetune", "default")))
    ablation = flat(OmegaConf.to_container(load_config("finetune", name)))
    assert set(ablation) == set(default)
    changed = {key: value for key, value in ablation.items() if value != default[key]}
    assert changed == {**ABLATIONS[name], "pretrained": None, "recipe": name, "run_name": name}


@torch.no_grad()
@pytest.mark.parametrize("name", ABLATIONS)
def test_builds_the_ablated_model(name):
    cfg = load_config("finetune", name)
    module = SwinV2Classifier(model=OmegaConf.to_container(cfg.model), **OmegaConf.to_container(cfg.optim),
                              **OmegaConf.to_container(cfg.train)).eval()
    blocks = [block for layer in module.model.layers for block in layer.blocks]
    (key, value), = ABLATIONS[name].items()
    attribute = key.removeprefix("model.")
    assert all(getattr(block if attribute == "norm_mode" else block.attn, attribute) == value for block in blocks)
    if value == "table":
        assert all(hasattr(block.attn, "relative_position_bias_table") and not hasattr(block.attn, "cpb_mlp")
                   for block in blocks)
    logits = module(torch.randn(2, 3, cfg.model.img_size, cfg.model.img_size))
    assert logits.shape == (2, cfg.model.num_classes) and torch.isfinite(logits).all()
