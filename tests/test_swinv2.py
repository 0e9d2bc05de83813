import copy
import math
from pathlib import Path

import pytest
import torch

from conftest import randomize_, tiny_swinv2
from simmim.models.swinv2 import VARIANTS, DropPath, SwinTransformerV2, build_swinv2, relative_coords_table

DATA = Path(__file__).parent / "data"


def _x(batch=2, size=64, chans=3):
    return torch.randn(batch, chans, size, size)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_structure_runs(name):
    """Each variant's depths, heads and extra norms at a tiny width (head dim 2) and 64 px."""
    heads = VARIANTS[name]["num_heads"]
    model = build_swinv2(name, img_size=64, window_size=4, embed_dim=2 * heads[0], num_classes=7)
    randomize_(model)
    out = model(_x())
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    extra = [n for n, _ in model.named_modules() if n.endswith("norm3")]
    if "extra_norm_every" in VARIANTS[name]:
        # every 6th block of a stage: giant's 42-block stage has 7, huge's 18-block stage 3
        assert len(extra) == sum(d // 6 for d in VARIANTS[name]["depths"]) > 0
    else:
        assert extra == []


def test_paper_parameter_counts():
    expected = {"tiny": 28.3e6, "small": 49.7e6, "base": 87.9e6, "large": 196.7e6, "huge": 658.0e6, "giant": 3.00e9}
    for name, count in expected.items():
        with torch.device("meta"):
            model = build_swinv2(name, img_size=192, window_size=12, num_classes=1000)
        params = sum(p.numel() for p in model.parameters())
        assert abs(params / count - 1) < 0.005, (name, params)


def test_every_parameter_gets_a_gradient():
    model = randomize_(tiny_swinv2(ape=True))
    model(_x()).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _outputs_and_grads(model, x):
    model.zero_grad()
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same_outputs_and_grads(reference, model, x, out_tol: float, grad_tol: float) -> None:
    """model's outputs and parameter gradients equal reference's, within tolerances relative to the largest."""
    out_a, grads_a = _outputs_and_grads(reference, x)
    out_b, grads_b = _outputs_and_grads(model, x)
    assert (out_b - out_a).abs().max() <= out_tol * out_a.abs().max()
    for name, grad in grads_a.items():
        assert (grads_b[name] - grad).abs().max() <= grad_tol * grad.abs().max(), name


@pytest.mark.parametrize("switch", ["use_checkpoint", "sequential_attn", "both"])
def test_memory_savers_match_plain_path(switch):
    plain = randomize_(tiny_swinv2(img_size=64, window_size=4)).train()
    saver = copy.deepcopy(plain)
    if switch in ("use_checkpoint", "both"):
        saver.set_grad_checkpointing(True)
    if switch in ("sequential_attn", "both"):
        saver.set_sequential_attn(True, chunk=3)  # stage 0 has 16 windows per image: 6 chunks, last one short
    x = _x()
    out_a, grads_a = _outputs_and_grads(plain, x)
    out_b, grads_b = _outputs_and_grads(saver, x)
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-6)
    for name, grad in grads_a.items():  # summation order differs, so compare against each tensor's scale
        assert (grads_b[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name


def test_sequential_chunks_split_windows_of_plain_and_shifted_blocks():
    """Chunking must split the windows of every block: 16 windows per image in chunks of 4 -> 4 calls of 4."""
    model = tiny_swinv2(sequential_attn=True, sequential_attn_chunk=4)
    x = _x()
    for block, layout in ((model.layers[0].blocks[0], "plain"), (model.layers[0].blocks[1], "shifted")):
        attn, calls = block.attn, []
        original = attn._attend
        attn._attend = lambda q, *rest, calls=calls, original=original: calls.append(tuple(q.shape[:2])) or original(q, *rest)
        model(x)
        heads = attn.num_heads
        # plain: (B*windows, heads, N, d); shifted: (B, windows*heads, N, d)
        expected = (x.shape[0] * 4, heads) if layout == "plain" else (x.shape[0], 4 * heads)
        assert calls == [expected] * 4, layout


@pytest.mark.parametrize("attn_mode", ["cosine", "dot"])
def test_fast_attention_matches_reference_formula(attn_mode):
    model = randomize_(tiny_swinv2(attn_mode=attn_mode)).eval()
    x = _x()
    with torch.no_grad():
        fast = model(x)
        model.set_attn_impl("reference")
        reference = model(x)
    assert (fast - reference).abs().max() <= 1e-5 * reference.abs().max()


@pytest.mark.parametrize("attn_mode", ["cosine", "dot"])
def test_fast_path_gradients_match_reference_path(attn_mode):
    """Training: the fast path's hand-written backward passes (normalize, token gathers) against autograd of
    the official order of operations, every parameter."""
    fast = randomize_(tiny_swinv2(attn_mode=attn_mode)).train()
    reference = copy.deepcopy(fast)
    reference.set_attn_impl("reference")
    _assert_same_outputs_and_grads(reference, fast, _x(), out_tol=1e-5, grad_tol=1e-4)


def test_drop_path_in_the_residual_add_draws_the_same_samples():
    drop = DropPath(0.5).train()
    x, branch = torch.randn(8, 4, 4, 16), torch.randn(8, 4, 4, 16)
    torch.manual_seed(1)
    fused = drop.add_to(x, branch)
    torch.manual_seed(1)
    torch.testing.assert_close(fused, x + drop(branch))
    assert 0 < (fused == x).all(dim=(1, 2, 3)).sum() < 8  # some samples dropped, not all


@pytest.mark.parametrize("case", ["swinv2_official_w4.pt", "swinv2_official_w8_pt4.pt"])
def test_matches_official_implementation(case):
    """Outputs of the official microsoft/Swin-Transformer code on random weights (see tests/data/README.md)."""
    ref = torch.load(DATA / case, weights_only=True)
    cfg = dict(ref["config"])
    model = SwinTransformerV2(**cfg).eval()
    model.load_state_dict(ref["state_dict"])  # official dict, derived buffers included
    with torch.no_grad():
        logits = model(ref["input"])
        pooled = model.forward_head(model.forward_features(ref["input"]), pre_logits=True)
        model.set_attn_impl("reference")
        logits_reference_path = model(ref["input"])
    torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=1e-4)
    torch.testing.assert_close(pooled, ref["features"], rtol=0, atol=1e-4)
    torch.testing.assert_close(logits_reference_path, ref["logits"], rtol=0, atol=1e-4)


OFFICIAL_KEYS_ONE_BLOCK_STAGES = [
    # SwinTransformerV2(img_size=32, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4, num_classes=10)
    "patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight", "patch_embed.norm.bias",
    "layers.0.blocks.0.norm1.weight", "layers.0.blocks.0.norm1.bias",
    "layers.0.blocks.0.attn.logit_scale", "layers.0.blocks.0.attn.q_bias", "layers.0.blocks.0.attn.v_bias",
    "layers.0.blocks.0.attn.cpb_mlp.0.weight", "layers.0.blocks.0.attn.cpb_mlp.0.bias",
    "layers.0.blocks.0.attn.cpb_mlp.2.weight", "layers.0.blocks.0.attn.qkv.weight",
    "layers.0.blocks.0.attn.proj.weight", "layers.0.blocks.0.attn.proj.bias",
    "layers.0.blocks.0.norm2.weight", "layers.0.blocks.0.norm2.bias",
    "layers.0.blocks.0.mlp.fc1.weight", "layers.0.blocks.0.mlp.fc1.bias",
    "layers.0.blocks.0.mlp.fc2.weight", "layers.0.blocks.0.mlp.fc2.bias",
    "layers.0.downsample.reduction.weight", "layers.0.downsample.norm.weight", "layers.0.downsample.norm.bias",
    "layers.1.blocks.0.norm1.weight", "layers.1.blocks.0.norm1.bias",
    "layers.1.blocks.0.attn.logit_scale", "layers.1.blocks.0.attn.q_bias", "layers.1.blocks.0.attn.v_bias",
    "layers.1.blocks.0.attn.cpb_mlp.0.weight", "layers.1.blocks.0.attn.cpb_mlp.0.bias",
    "layers.1.blocks.0.attn.cpb_mlp.2.weight", "layers.1.blocks.0.attn.qkv.weight",
    "layers.1.blocks.0.attn.proj.weight", "layers.1.blocks.0.attn.proj.bias",
    "layers.1.blocks.0.norm2.weight", "layers.1.blocks.0.norm2.bias",
    "layers.1.blocks.0.mlp.fc1.weight", "layers.1.blocks.0.mlp.fc1.bias",
    "layers.1.blocks.0.mlp.fc2.weight", "layers.1.blocks.0.mlp.fc2.bias",
    "norm.weight", "norm.bias", "head.weight", "head.bias",
]


def test_state_dict_keys_are_the_official_ones():
    model = SwinTransformerV2(img_size=32, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4,
                              num_classes=10, pretrained_window_sizes=[0, 0])
    assert list(model.state_dict()) == OFFICIAL_KEYS_ONE_BLOCK_STAGES
    assert model.state_dict()["layers.0.blocks.0.attn.logit_scale"].shape == (2, 1, 1)
    assert model.state_dict()["layers.0.downsample.reduction.weight"].shape == (32, 64)


def test_loading_a_state_dict_with_derived_buffers():
    source = randomize_(tiny_swinv2())
    state = source.state_dict()
    for name, module in source.named_modules():  # what official checkpoints also carry
        for buffer in ("relative_coords_table", "relative_position_index", "attn_mask"):
            if getattr(module, buffer, None) is not None:
                state[f"{name}.{buffer}"] = getattr(module, buffer)
    assert any(k.endswith("attn_mask") for k in state) and any(k.endswith("relative_position_index") for k in state)
    target = tiny_swinv2()
    result = target.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = _x()
    torch.testing.assert_close(target.eval()(x), source.eval()(x))


def test_window_larger_than_feature_map_is_clipped_without_shift():
    model = tiny_swinv2(img_size=64, window_size=8)  # maps 16, 8, 4, 2
    sizes = [(b.window_size, b.shift_size) for layer in model.layers for b in layer.blocks]
    assert sizes == [(8, 0), (8, 4), (8, 0), (8, 0), (4, 0), (4, 0), (2, 0), (2, 0)]
    assert model.layers[3].blocks[0].attn.relative_position_index.shape == (4, 4)
    assert torch.isfinite(randomize_(model)(_x())).all()


def test_bad_image_sizes_fail_early_with_accepted_sizes():
    with pytest.raises(ValueError, match=r"img_size 200 .*multiple of 32.*use img_size in \[224, 448"):
        SwinTransformerV2(img_size=200, window_size=7)
    with pytest.raises(ValueError, match=r"img_size 160 .*window 12.*use img_size in \[.*192"):
        SwinTransformerV2(img_size=160, window_size=12)
    model = tiny_swinv2()
    with pytest.raises(ValueError, match="3-channel"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"expected input \(B, 3, H, W\)"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="norm_mode"):
        tiny_swinv2(norm_mode="post")


def test_log_cpb_coordinates():
    table = relative_coords_table(window_size=3)  # offsets -2..2, divided by 2, times 8
    x = torch.tensor([-8.0, -4.0, 0.0, 4.0, 8.0])
    expected = torch.sign(x) * torch.log2(x.abs() + 1) / math.log2(8)
    torch.testing.assert_close(table[:, 0, 0], expected)  # dy down the rows
    torch.testing.assert_close(table[0, :, 1], expected)  # dx along the columns
    torch.testing.assert_close(table[:, 0, 1], torch.full((5,), expected[0].item()))
    pretrained = relative_coords_table(window_size=5, pretrained_window_size=3)
    torch.testing.assert_close(pretrained[2:7, 2:7], table)  # shared offsets map to the same inputs


def test_logit_scale_is_clamped():
    model = randomize_(tiny_swinv2()).eval()
    x = _x()
    attn = model.layers[0].blocks[0].attn
    with torch.no_grad():
        attn.logit_scale.fill_(math.log(100.0))
        at_clamp = model(x)
        attn.logit_scale.fill_(math.log(1000.0))
        above_clamp = model(x)
        attn.logit_scale.fill_(math.log(50.0))
        below_clamp = model(x)
    torch.testing.assert_close(above_clamp, at_clamp)
    assert not torch.allclose(below_clamp, at_clamp)


def test_eval_position_bias_is_cached_until_weights_change():
    model = randomize_(tiny_swinv2()).eval()
    attn = model.layers[0].blocks[0].attn
    calls = []
    original = attn._compute_position_bias
    attn._compute_position_bias = lambda: calls.append(1) or original()
    x = _x()
    with torch.no_grad():
        first = model(x)
        model(x)
        assert len(calls) == 1
        attn.cpb_mlp[2].weight.mul_(2.0)  # an in-place update, as an optimizer step does
        changed = model(x)
        assert len(calls) == 2
    assert not torch.allclose(first, changed)
    model.train()
    model(x)
    model.train()
    model(x)
    assert len(calls) == 4  # training never reuses a table


@pytest.mark.parametrize("kwargs", [dict(norm_mode="pre_norm"), dict(attn_mode="dot"),
                                    dict(position_bias="linear_cpb"), dict(position_bias="table"),
                                    dict(position_bias="none")])
def test_ablation_switches(kwargs):
    model = randomize_(tiny_swinv2(**kwargs))
    out = model(_x())
    assert torch.isfinite(out).all()
    keys = model.state_dict().keys()
    assert any("cpb_mlp" in k for k in keys) == (kwargs.get("position_bias", "log_cpb") in ("log_cpb", "linear_cpb"))
    assert any("relative_position_bias_table" in k for k in keys) == (kwargs.get("position_bias") == "table")
    assert any("logit_scale" in k for k in keys) == (kwargs.get("attn_mode", "cosine") == "cosine")


def test_pre_norm_differs_from_post_norm_with_same_weights():
    post = randomize_(tiny_swinv2())
    pre = tiny_swinv2(norm_mode="pre_norm")
    pre.load_state_dict(post.state_dict())
    x = _x()
    assert not torch.allclose(pre(x), post(x))


def test_forward_intermediates_and_feature_info():
    model = randomize_(tiny_swinv2()).eval()
    x = _x()
    final, maps = model.forward_intermediates(x)
    assert [tuple(m.shape) for m in maps] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)]
    assert [f["num_chs"] for f in model.feature_info] == [16, 32, 64, 128]
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
    torch.testing.assert_close(final, model.forward_features(x))
    _, normed = model.forward_intermediates(x, indices=[-1], norm=True)
    torch.testing.assert_close(normed[0], final.permute(0, 3, 1, 2))


def test_no_weight_decay_names():
    model = tiny_swinv2()
    assert model.no_weight_decay_keywords() == {"cpb_mlp", "logit_scale", "relative_position_bias_table"}
    assert "absolute_pos_embed" in model.no_weight_decay()


def test_torch_compile_matches_eager():
    model = randomize_(tiny_swinv2(img_size=32, depths=(2, 2), num_heads=(2, 4), window_size=4)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("settings", [{}, {"sequential_attn": True, "sequential_attn_chunk": 4}, {"training": False},
                                      {"attn_impl": "flex", "training": False}])
def test_block_compiles_without_graph_breaks(settings):
    """torch.compile must see a shifted block as one graph (no Python fallbacks on the hot path)."""
    settings = dict(settings)
    training = settings.pop("training", True)
    model = tiny_swinv2(**settings).train(training)
    block = model.layers[0].blocks[1]
    assert block.shift_size > 0
    torch._dynamo.reset()
    with torch.set_grad_enabled(training):  # flex: PyTorch has no FlexAttention backward on CPU
        explanation = torch._dynamo.explain(block)(torch.randn(2, 16, 16, block.dim, requires_grad=training))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("kwargs", [{}, {"attn_mode": "dot"}, {"position_bias": "table"}, {"position_bias": "none"}])
def test_flex_attention_matches_reference_formula(kwargs):
    """FlexAttention (forward only: PyTorch has no flex backward on CPU; the CUDA test below checks gradients)."""
    model = randomize_(tiny_swinv2(**kwargs)).eval()
    x = _x()
    with torch.no_grad():
        reference = model(x)
        model.set_attn_impl("flex")
        flex = model(x)
    assert (flex - reference).abs().max() <= 1e-5 * reference.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has a backward on CUDA only")
def test_flex_attention_gradients_match_reference_on_cuda():
    reference = randomize_(tiny_swinv2()).cuda().train()
    flex = copy.deepcopy(reference)
    flex.set_attn_impl("flex")
    reference.set_attn_impl("reference")
    _assert_same_outputs_and_grads(reference, flex, _x().cuda(), out_tol=1e-4, grad_tol=1e-3)


def test_flex_attention_settings_fail_early():
    with pytest.raises(ValueError, match="attn_drop_rate=0"):
        tiny_swinv2(attn_impl="flex", attn_drop_rate=0.1)
    with pytest.raises(ValueError, match="sequential_attn needs attn_impl='fast'"):
        tiny_swinv2(attn_impl="flex", sequential_attn=True)


def test_cpu_linear_matches_torch():
    """The oneDNN linear of eager CPU float32 (simmim.models.kernels.linear): outputs and all three gradients."""
    from simmim.models.kernels import linear

    x = torch.randn(2, 5, 7, 24, requires_grad=True)
    weight, bias = torch.randn(40, 24, requires_grad=True), torch.randn(40, requires_grad=True)
    grad = torch.randn(2, 5, 7, 40)
    ours = linear(x, weight, bias)
    theirs = torch.nn.functional.linear(x, weight, bias)
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(torch.autograd.grad(ours, (x, weight, bias), grad),
                    torch.autograd.grad(theirs, (x, weight, bias), grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert ours.grad_fn is not theirs.grad_fn and "OneDNN" in type(ours.grad_fn).__name__


@pytest.mark.parametrize("heads,chunk_matrices", [(3, 6), (3, 4), (8, 2), (8, 5)])
def test_cpu_biased_attention_chunks_match_autograd(monkeypatch, heads, chunk_matrices):
    """The chunked CPU attention with a bias gradient (chunks of several images' heads, or of part of one
    image's heads, and a short last chunk): output and all four gradients against autograd of the formula."""
    from simmim.models import kernels

    N = 9
    monkeypatch.setattr(kernels, "ATTN_CHUNK_BYTES", chunk_matrices * N * N * 4)
    q, k, v = (torch.randn(5, heads, N, 4, requires_grad=True) for _ in range(3))
    bias = torch.randn(heads, N, N, requires_grad=True)
    ours = kernels.BiasedAttention.apply(q, k, v, bias)
    theirs = (q @ k.transpose(-2, -1) + bias).softmax(dim=-1) @ v
    torch.testing.assert_close(ours, theirs)
    grad = torch.randn_like(ours)
    inputs = (q, k, v, bias)
    for a, b in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(theirs, inputs, grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert kernels.attention_chunks(5, heads, N, 4) != 5 * heads  # more than one chunk


def test_cpu_split_heads_matches_permute_and_unbind():
    """q, k, v split by `SplitHeads` (one copy, one-buffer backward; both attention paths use it on CPU)
    against autograd of the view, permute and unbind, also when only some of the three get a gradient."""
    from simmim.models.kernels import SplitHeads

    qkv = torch.randn(4, 9, 3 * 2 * 5, requires_grad=True)
    weights = [torch.randn(4, 2, 9, 5) for _ in range(3)]
    for used in ([0, 1, 2], [2], [0, 1]):
        ours = SplitHeads.apply(qkv, 2)
        theirs = qkv.view(4, 9, 3, 2, 5).permute(2, 0, 3, 1, 4).unbind(0)
        for a, b in zip(ours, theirs):
            assert a.is_contiguous() and torch.equal(a, b)
        grads = [torch.autograd.grad(sum((t[i] * weights[i]).sum() for i in used), qkv)[0] for t in (ours, theirs)]
        assert torch.equal(grads[0], grads[1]), used
