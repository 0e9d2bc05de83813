"""The memory planner (simmim/tools/memory.py, simmim/tools/plan_memory.py): CPU peaks measured, predictions against them,
the SwinV2-G plan, and data.img_size as the image-size key."""
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import assert_kept_beside, run_script
from simmim.train.config import ConfigError, load_config
from simmim.tools.memory import GIB, SAVERS, ModelMemory, peak_memory, saver_activations, step_timeline
from simmim.models.simmim import build_simmim
from simmim.train.optim import param_groups

ROOT = Path(__file__).resolve().parents[1]
import simmim.tools.plan_memory as plan_memory_script

TINY = dict(embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4)
SMALL = dict(embed_dim=32, depths=[2, 2, 6, 2], num_heads=[2, 4, 8, 16], window_size=4)


def test_cpu_peak_follows_allocations_and_frees():
    before = torch.empty(10_000_000, dtype=torch.uint8)  # allocated before the step: not counted

    def step():
        a = torch.empty(4_000_000, dtype=torch.uint8)
        b = torch.empty(2_000_000, dtype=torch.uint8)
        del a
        c = torch.empty(8_000_000, dtype=torch.uint8)  # 2 + 8 MB at once: the peak
        del b, c
        return torch.empty(1_000_000, dtype=torch.uint8)

    peak = peak_memory(step)
    assert 10_000_000 <= peak < 10_100_000
    del before


def _held_bytes(model, optimizer) -> int:
    states = (s for state in optimizer.state.values() for s in state.values() if torch.is_tensor(s))
    return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers(), states))


@pytest.mark.parametrize("arch, img_size, savers", [
    (TINY, 32, list(SAVERS)),
    (TINY, 64, ["none", "checkpointing"]),
    (SMALL, 32, ["none", "checkpointing"]),
])
def test_prediction_is_within_25_percent_of_a_cpu_training_step(arch, img_size, savers):
    """Prediction: params + grads + AdamW states + buffers + activations(batch) of the planner, measured from
    the same model on the CPU; truth: what was allocated before a steady-state step (params, buffers, AdamW
    states) plus the step's peak. Sequential attention in chunks of 1 window, so the tiny maps chunk."""
    torch.manual_seed(0)
    model = build_simmim(dict(arch, img_size=img_size, sequential_attn_chunk=1))
    memory = ModelMemory.measure(model, "32-true", chunk=1, savers=savers)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)
    batch, grid = 8, img_size // 4
    x, mask = torch.randn(batch, 3, img_size, img_size), (torch.rand(batch, grid, grid) < 0.6).long()

    def step():
        model(x, mask).backward()
        optimizer.step()

    for name in savers:
        model.encoder.set_grad_checkpointing(SAVERS[name][0])
        model.encoder.set_sequential_attn(SAVERS[name][1], chunk=1)
        step()
        optimizer.zero_grad(set_to_none=True)
        measured = _held_bytes(model, optimizer) + peak_memory(step)
        optimizer.zero_grad(set_to_none=True)
        predicted = memory.training_bytes(name, batch)
        assert 0.75 < predicted / measured < 1.25, (name, predicted, measured)


def test_savers_and_precision_move_the_prediction_the_right_way():
    cfg, savers = dict(TINY, img_size=64, sequential_attn_chunk=1), ("none", "checkpointing")
    with torch.device("meta"):
        fp32 = ModelMemory.measure(build_simmim(cfg), "32-true", chunk=1, savers=savers)
        bf16 = ModelMemory.measure(build_simmim(cfg).to(torch.bfloat16), "bf16-true", chunk=1, savers=savers)
        mixed = ModelMemory.measure(build_simmim(cfg), "bf16-mixed", chunk=1, savers=savers)
    per_image = {name: a.at(9) - a.at(8) for name, a in fp32.activations.items()}
    assert per_image["checkpointing"] < per_image["none"]
    for name in per_image:  # bfloat16 activations take about half the bytes; autocast keeps some in float32
        assert 0.4 < bf16.activations[name].at(8) / fp32.activations[name].at(8) < 0.65
        assert 0.5 < mixed.activations[name].at(8) / fp32.activations[name].at(8) < 0.95
    assert bf16.static().training == pytest.approx(fp32.static().training / 2, rel=0.01)  # buffers stay
    assert mixed.static().params == fp32.static().params  # float32 master weights


def test_activations_fitted_at_two_batches_are_the_peak_of_a_traced_step():
    """On the meta device (emulated CUDA autocast and attention kernel, checkpoints recomputing under them),
    every op's bytes are affine in the batch from 2 images on: the activations fitted from steps of 2 and 3
    images are the peak of a traced step of 5; at 1 image (no sums over a broadcast batch) they lean high."""
    with torch.device("meta"):
        model = build_simmim(dict(TINY, img_size=64, sequential_attn_chunk=1))  # 4 windows in stage 0
    names = ("none", "checkpointing+sequential")
    fitted = saver_activations(model, "bf16-mixed", chunk=1, savers=names)
    for name, savers in ((name, SAVERS[name]) for name in names):
        assert fitted[name].at(5) == pytest.approx(max(step_timeline(model, 5, "bf16-mixed", *savers, chunk=1)))
        assert fitted[name].at(1) >= max(step_timeline(model, 1, "bf16-mixed", *savers, chunk=1))


@pytest.fixture(scope="module")
def giant_plan(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "giant.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "plan_memory.py"), "recipe=giant", "data.img_size=1536",
         "model.window_size=48", "trainer.devices=64", f"json={path}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, json.loads(path.read_text())


def test_giant_command_prints_a_table_for_every_saver_and_stage(giant_plan):
    table, plan = giant_plan
    assert "1536 px, window 48, bf16-mixed, 64 GPU(s)" in table
    savers = ["none", "sequential", "checkpointing", "checkpointing+sequential"]
    stages = ["DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3/FSDP"]
    assert [(r["savers"], r["sharding"]) for r in plan["rows"]] == [(s, z) for s in savers for z in stages]
    marked = [line for line in table.splitlines() if line.startswith("*")]
    assert len(marked) == 1 and "checkpointing+sequential" in marked[0] and "ZeRO-3/FSDP" in marked[0]
    assert "TorchDispatchMode" in plan["assumptions"]


def _bias_gradient_bytes(windows: int, heads: int, window_size: int) -> int:
    """Bytes per image of the gradient CUDA's memory-efficient attention writes for a broadcast position bias
    (or bias + shift mask) in bfloat16: one (N, N) matrix per window and head, N = window_size^2."""
    return windows * heads * window_size ** 4 * 2


def test_giant_plan_moves_the_right_way(giant_plan):
    _, plan = giant_plan
    rows = {(r["savers"], r["sharding"]): r for r in plan["rows"]}
    assert all(r["activations_fixed"] >= 0 and r["activations_per_image"] > 0 for r in plan["rows"])
    savers = ("none", "sequential", "checkpointing", "checkpointing+sequential")
    one_image = {s: rows[(s, "DDP")]["activations_fixed"] + rows[(s, "DDP")]["activations_per_image"] for s in savers}
    assert one_image["none"] > one_image["sequential"] and one_image["none"] > one_image["checkpointing"]
    assert one_image["checkpointing"] > one_image["checkpointing+sequential"]

    # SwinV2-G at 1536 px / window 48: stage maps 384, 192, 96, 48 tokens wide, so 64, 16, 4, 1 windows of
    # N = 2304 tokens, 16, 32, 64, 128 heads; every other block of stages 0-2 is shifted (2, 2, 42 blocks).
    windows, heads, depths = (64, 16, 4), (16, 32, 64), (2, 2, 42)
    first = _bias_gradient_bytes(windows[0], heads[0], 48)
    per_image = {s: rows[(s, "ZeRO-3/FSDP")]["activations_per_image"] for s in savers}
    assert per_image["checkpointing"] >= first  # stage 0's attention backward at once: a 10 GiB gradient per image
    assert per_image["checkpointing+sequential"] < first  # 2 windows per call instead of 64
    held_shift_terms = sum(_bias_gradient_bytes(w, h, 48) * d // 2 for w, h, d in zip(windows, heads, depths))
    assert one_image["none"] > held_shift_terms  # each shifted block's (windows x heads, N, N) bias + mask term

    with torch.device("meta"):  # SwinV2-G: 3.0 B parameters (paper, table 1), float32 under bf16-mixed
        model = build_simmim(OmegaConf.to_container(load_config("pretrain", "giant").model))
    num_params = sum(p.numel() for p in model.parameters())
    assert 2.9e9 < num_params < 3.1e9
    ddp, zero3 = rows[("none", "DDP")], rows[("none", "ZeRO-3/FSDP")]
    assert ddp["params"] == pytest.approx(4 * num_params, rel=1e-6)
    assert zero3["params"] == pytest.approx(4 * num_params / 64, rel=1e-6)
    assert zero3["optimizer"] == pytest.approx(8 * num_params / 64, rel=1e-6)
    stages = ("DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3/FSDP")
    for stage in stages:  # savers only ever make room
        batch = {s: rows[(s, stage)]["max_batch"] for s in savers}
        assert batch["none"] <= min(batch["sequential"], batch["checkpointing"])
        assert batch["checkpointing"] <= batch["checkpointing+sequential"]
    for name in ("checkpointing", "checkpointing+sequential"):
        batches = [rows[(name, stage)]["max_batch"] for stage in stages]
        assert batches == sorted(batches) and batches[-1] >= 1
        row = rows[(name, "ZeRO-3/FSDP")]
        static = sum(row[k] for k in ("params", "grads", "optimizer", "buffers", "communication"))
        activations = row["activations_fixed"] + row["max_batch"] * row["activations_per_image"]
        assert static + activations <= 0.9 * 80 * GIB  # the default budget: 80 GiB less 10 % headroom


def test_command_line_errors_name_the_fix():
    for args, message in ((["gpu_memory_gb=lots"], r"gpu_memory_gb=lots: expected a number > 0 \(GiB per GPU\), "
                                                   "e.g. gpu_memory_gb=80"),
                          (["gpu_memory_gb=-1"], r"gpu_memory_gb=-1: expected a number > 0"),  # was: a plan of 0
                          (["gpu_memory_gb=inf"], r"gpu_memory_gb=inf: expected a number > 0"),  # was: the cap
                          (["trainer.strategy=ddpp"], r"unknown trainer.strategy 'ddpp'; did you mean ddp"),  # was: a
                          (["headroom=1"], r"headroom=1: expected a number in \[0, 1\)"),  # plan of it
                          (["json=."], r"json=. is a folder; pass the path of a .json file"),
                          (["trainer.devices=auto"], "trainer.devices=auto does not say how many GPUs"),
                          (["model.windw_size=8"], "unknown key 'model.windw_size'.*model.window_size")):
        with pytest.raises(ValueError, match=message):
            plan_memory_script.main(args)


@pytest.mark.timeout(60)
def test_a_rerun_keeps_the_earlier_plan(tmp_path):
    path = tmp_path / "plan.json"
    first = run_script("simmim.tools.plan_memory", "recipe=default", f"json={path}")
    assert first.returncode == 0 and first.stderr == "", first.stderr
    earlier, written = path.read_bytes(), path.stat().st_mtime
    second = run_script("simmim.tools.plan_memory", "recipe=default", "gpu_memory_gb=40", f"json={path}", "--json")
    assert second.returncode == 0 and json.loads(second.stdout)["gpu_memory_gb"] == 40  # stdout: the JSON alone
    assert_kept_beside(path, earlier, written)
    assert second.stderr.startswith("kept the earlier plan.json as ") and second.stderr.count("\n") == 1


def test_data_img_size_is_the_image_size_key():
    for stage in ("pretrain", "finetune"):
        for recipe in ("default", "base", "giant"):
            cfg = load_config(stage, recipe)
            assert cfg.model.img_size == cfg.data.img_size
        assert load_config(stage, "base", ["data.img_size=384"]).model.img_size == 384
        with pytest.raises(ConfigError, match=r"model.img_size=256 differs from data.img_size=\d+; set data.img_size"):
            load_config(stage, "base", ["model.img_size=256"])  # the images would not fit the model
    with pytest.raises(ConfigError, match="did you mean data.img_size"):
        load_config("pretrain", "default", ["data.img_sise=96"])
