"""Plan the GPU memory of SimMIM pretraining without a GPU: per GPU, the parameters, gradients, AdamW states,
buffers and activations (fixed per step and per image) of every saver setting (none, sequential attention,
activation checkpointing, both) and sharding stage (DDP, ZeRO-1, ZeRO-2, ZeRO-3/FSDP), and the largest batch
per GPU that fits.

    python scripts/plan_memory.py recipe=giant data.img_size=1536 model.window_size=48 trainer.devices=64
    python scripts/plan_memory.py recipe=base trainer.precision=bf16-true gpu_memory_gb=40 json=plan.json
    python scripts/plan_memory.py recipe=large --json                  # the plan as JSON on stdout

Arguments are key=value: recipe=NAME and any key of a pretraining recipe, as for scripts/pretrain.py (the model,
data.img_size, trainer.precision, trainer.devices x trainer.num_nodes GPUs; trainer.strategy and the recipe's
savers mark its row with *), plus gpu_memory_gb=80 (GiB per GPU), headroom=0.1 (the share of it left for the
CUDA context and the allocator's cache), json=PATH (also write the plan as JSON; an earlier plan there is kept
beside it as <name>.<UTC time it was written>.json, any other file is refused) and --json (print JSON instead of
the table). The model is built on the meta device, so nothing is allocated; SwinV2-G takes about half a minute.
How the numbers are made, and what they assume: simmim/tools/memory.py.
"""
import json
import math

from omegaconf import OmegaConf

from simmim.cli import check_result_file, json_with, keeping_earlier
from simmim.train.config import ConfigError, config_from_argv
from simmim.tools.memory import format_plan, plan_memory

PLANNER_KEYS = {"gpu_memory_gb": "80", "headroom": "0.1", "json": None}


def split_planner_keys(argv: list[str]) -> tuple[dict, list[str]]:
    """(the planner's own key=value arguments over their defaults, the recipe's arguments)."""
    keys, rest = dict(PLANNER_KEYS), []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in keys:
            keys[key] = value
        else:
            rest.append(arg)
    return keys, rest


def number(keys: dict, name: str, ok, expected: str) -> float:
    """keys[name] as a number for which ok(number) holds (`expected` says which)."""
    try:
        value = float(keys[name])
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise ConfigError(f"{name}={keys[name]}: expected {expected}, e.g. {name}={PLANNER_KEYS[name]}")
    return value


def main(argv: list[str]) -> None:
    as_json = "--json" in argv
    keys, recipe_args = split_planner_keys([a for a in argv if a != "--json"])
    parsed = config_from_argv("pretrain", recipe_args, __doc__, here=False)  # a plan of GPUs, made anywhere
    if parsed is None:
        return
    cfg, print_config = parsed
    if print_config:
        print(OmegaConf.to_yaml(cfg), end="")
        return
    gpu_memory_gb = number(keys, "gpu_memory_gb", lambda v: 0 < v < math.inf, "a number > 0 (GiB per GPU)")
    headroom = number(keys, "headroom", lambda v: 0 <= v < 1, "a number in [0, 1)")
    if keys["json"]:
        check_result_file(keys["json"], json_with("rows", "assumptions"), "memory plan", "json")  # before the plan
    plan = plan_memory(cfg, gpu_memory_gb=gpu_memory_gb, headroom=headroom)
    text = json.dumps(plan.to_dict(), indent=2)
    if keys["json"]:
        with keeping_earlier(keys["json"]) as (tmp,):
            tmp.write_text(text + "\n")
    print(text if as_json else format_plan(plan))

