"""Makes tests/data/timm_swinv2.pt with real timm (not a dependency of this project): run it in a separate
environment, e.g. `python3 -m venv /tmp/timmvenv && /tmp/timmvenv/bin/pip install torch timm` (the file in
the repository was made with torch 2.14.1 and timm 1.0.31 on CPU) and `/tmp/timmvenv/bin/python
tests/data/make_timm_fixture.py`.

timm's SwinTransformerV2 is built with the tiny test settings at window 8 over windows pretrained at 4 (so
the log-spaced position bias is used beyond the pretrained range), its weights randomized as in the official
fixtures (tests/data/README.md), and run in float32 eval mode on one input."""
from pathlib import Path

import timm
import torch
from timm.models.swin_transformer_v2 import SwinTransformerV2

KWARGS = dict(img_size=64, patch_size=4, in_chans=3, num_classes=10, embed_dim=16, depths=[2, 2, 2, 2],
              num_heads=[2, 2, 4, 8], window_size=8, mlp_ratio=4.0, qkv_bias=True,
              pretrained_window_sizes=[4, 4, 4, 2])


@torch.no_grad()
def main() -> None:
    torch.manual_seed(0)
    model = SwinTransformerV2(**KWARGS, drop_path_rate=0.0).eval()
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape)
        if name.endswith("logit_scale"):
            p.copy_(torch.log(torch.tensor(10.0)) + 0.3 * noise)
        elif p.dim() == 1 and "norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.2 * noise)
        else:
            p.copy_(0.2 * noise)
    x = torch.randn(2, 3, 64, 64)
    features = model.forward_head(model.forward_features(x), pre_logits=True)
    state_dict = model.state_dict()
    torch.save({"kwargs": KWARGS, "state_dict": state_dict, "timm_keys": list(state_dict), "input": x,
                "logits": model(x), "features": features, "versions": f"torch {torch.__version__}, "
                f"timm {timm.__version__}"}, Path(__file__).parent / "timm_swinv2.pt")


if __name__ == "__main__":
    main()
