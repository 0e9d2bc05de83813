"""model.compile (per-block torch.compile) and trainer.tf32."""
import copy
from types import SimpleNamespace

import pytest
import torch

from conftest import randomize_
from simmim.models.simmim import build_simmim
from simmim.pretrain import SimMIMPretrainModule
from simmim.train.config import ConfigError, load_config
from simmim.train.optim import make_adamw, param_groups
from simmim.train.speed import compile_wanted, set_tf32


def _train(simmim, x, mask, steps=3):
    optimizer = make_adamw(param_groups(simmim, 0.05), lr=1e-3, fused=False)
    losses = []
    for _ in range(steps):
        loss = simmim(x, mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_compiled_blocks_train_like_eager_with_checkpointing_and_sequential_attention():
    """One stage (a plain and a shifted block), both memory savers on: the compiled blocks run inside the
    activation checkpoints and hold the chunked attention in their graphs, and train as the eager model does."""
    eager = build_simmim(dict(img_size=32, embed_dim=16, depths=(2,), num_heads=(2,), window_size=4,
                              drop_path_rate=0.0, use_checkpoint=True, sequential_attn=True, sequential_attn_chunk=2))
    randomize_(eager.encoder)
    compiled = copy.deepcopy(eager)
    compiled.encoder.compile_blocks()
    assert all(block._compiled_call_impl is not None for block in compiled.encoder.layers[0].blocks)
    x, mask = torch.randn(2, 3, 32, 32), (torch.rand(2, 8, 8) < 0.5).float()
    torch._dynamo.reset()
    assert _train(compiled, x, mask) == pytest.approx(_train(eager, x, mask), rel=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=name)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints keep the official names


def test_compile_setting():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compile_wanted("auto", cuda) and not compile_wanted("auto", cpu)
    assert compile_wanted(True, cpu) and not compile_wanted(False, cuda)
    with pytest.raises(ConfigError, match="model.compile='yes'"):
        compile_wanted("yes", cpu)


@pytest.mark.parametrize("setting, device, compiled", [("auto", "cpu", False), ("auto", "cuda", True), (True, "cpu", True)])
def test_module_compiles_its_blocks_for_the_run_device(setting, device, compiled):
    cfg = load_config("pretrain", "default", [f"model.compile={str(setting).lower()}"])
    module = SimMIMPretrainModule(model=dict(cfg.model))
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
    module.configure_model()
    blocks = [b for layer in module.simmim.encoder.layers for b in layer.blocks]
    assert module.compiled == compiled
    assert all((getattr(b, "_compiled_call_impl", None) is not None) == compiled for b in blocks)


def test_size_recipes_compile_on_cuda_and_tf32_is_a_recipe_key():
    for stage in ("pretrain", "finetune"):
        assert load_config(stage, "base").model.compile == "auto"
        assert load_config(stage, "default").trainer.tf32 is True
    assert set_tf32(True, torch.device("cpu")) is False  # CPU runs are left alone
