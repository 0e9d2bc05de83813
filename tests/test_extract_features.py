"""scripts/extract_features.py on tiny checkpoints of our layouts, and the README's backbone example."""
import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from conftest import randomize_, run_script
from simmim.train.config import ConfigError
from simmim.data.decode import read_image
from simmim.data.sources import digits_split
from simmim.data.transforms import eval_transform
from simmim.pretrain import SimMIMPretrainModule
from simmim.models.swinv2 import SwinTransformerV2

import simmim.tools.extract_features as extract_features
from simmim.tools.extract_features import output_path

MODEL = dict(img_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
             drop_path_rate=0.0)
FAST = ["batch_size=50", "num_workers=0", "device=cpu"]


@pytest.fixture(scope="module")
def pretrained():
    """A randomized tiny SimMIM module (post-norms non-zero, so features depend on every block) and its encoder."""
    module = randomize_(SimMIMPretrainModule(model=MODEL), seed=3)
    encoder = SwinTransformerV2(**MODEL, num_classes=0)
    encoder.load_state_dict({k.removeprefix("simmim.encoder."): v for k, v in module.state_dict().items()
                             if k.startswith("simmim.encoder.") and not k.endswith("mask_token")})
    return module, encoder.eval()


@torch.no_grad()
def expected_pooled(encoder, images: list[np.ndarray]) -> torch.Tensor:
    """(N, C) pooled features computed here, independently of the script: eval transform, forward_features, mean."""
    x = torch.stack([eval_transform(32)(image=image)["image"] for image in images])
    return encoder.forward_features(x).mean(dim=(1, 2))


def digit_images(indices) -> list[np.ndarray]:
    digits = load_digits()
    gray = [cv2.resize(np.rint(digits.images[i] * (255 / 16)).astype(np.uint8), (32, 32),
                       interpolation=cv2.INTER_CUBIC) for i in indices]
    return [cv2.cvtColor(g, cv2.COLOR_GRAY2RGB) for g in gray]


def test_digits_from_a_lightning_checkpoint_to_pt(tmp_path, pretrained, capsys):
    module, encoder = pretrained
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpt)
    extract_features.main([f"checkpoint={ckpt}", "data.source=digits", "data.split=val", "maps=true",
                           f"out={tmp_path / 'val'}", *FAST])
    assert "lightning-simmim checkpoint" in capsys.readouterr().out
    features = torch.load(tmp_path / "val.pt", weights_only=False)

    val = digits_split()[1]
    assert features["paths"] == [f"digits:{i}" for i in val] and set(features["splits"]) == {"val"}
    assert torch.equal(features["labels"], torch.as_tensor(load_digits().target[val]))
    assert features["pooled"].shape == (len(val), 32)
    assert [tuple(s.shape) for s in features["stages"]] == [(len(val), 16), (len(val), 32)]
    assert [tuple(m.shape) for m in features["maps"]] == [(len(val), 16, 8, 8), (len(val), 32, 4, 4)]
    assert torch.allclose(features["stages"][-1], features["pooled"], atol=1e-6)  # last stage with the final norm
    assert torch.allclose(features["stages"][0], features["maps"][0].mean(dim=(2, 3)), atol=1e-6)
    assert [info["num_chs"] for info in features["feature_info"]] == [16, 32]
    assert features["layout"] == "lightning-simmim" and features["model"]["embed_dim"] == 16

    first = [0, 1, 100]
    expected = expected_pooled(encoder, digit_images(val[first]))
    assert torch.allclose(features["pooled"][first], expected, atol=1e-5)
    assert features["pooled"].std(dim=0).mean() > 1e-3  # images give different features


def test_folder_from_an_exported_encoder_to_npy(tmp_path, pretrained, monkeypatch):
    """data.root relative to the working directory: the saved paths are absolute (they were relative to it)."""
    module, encoder = pretrained
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(3):
            cv2.imwrite(str(tmp_path / "images" / name / f"{i}.png"), rng.integers(0, 256, (40, 48, 3), np.uint8))
    exported = module.export_encoder(tmp_path / "encoder.pth", {"model": MODEL})
    extract_features.main([f"checkpoint={exported}", "data.root=images", "format=npy", "out=features", *FAST])

    out = tmp_path / "features"
    paths = (out / "paths.txt").read_text().splitlines()
    assert sorted(paths) == sorted(str(p) for p in (tmp_path / "images").rglob("*.png"))
    labels = np.load(out / "labels.npy")
    assert list(labels) == [0 if "/cat/" in p else 1 for p in paths]
    pooled = np.load(out / "pooled.npy")
    assert pooled.shape == (6, 32) and np.load(out / "stage0.npy").shape == (6, 16)
    assert not (out / "map0.npy").exists()
    expected = expected_pooled(encoder, [read_image(p) for p in paths])
    assert np.allclose(pooled, expected.numpy(), atol=1e-5)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["layout"] == "exported-simmim" and meta["model"]["depths"] == [2, 2]

    # a second run into the same folder is refused and changes nothing; overwrite=true replaces what it writes
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    args = [f"checkpoint={exported}", f"data.root={tmp_path / 'images'}", "format=npy", f"out={out}", *FAST]
    with pytest.raises(ConfigError, match=f"out={out}: the folder exists; give another out= or add overwrite=true"):
        extract_features.main(args + ["maps=true"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    extract_features.main(args + ["maps=true", "overwrite=true"])
    assert np.load(out / "map1.npy").shape[:2] == (6, 32)
    extract_features.main(args + ["overwrite=true"])  # the maps of the run it replaced do not stay
    assert not list(out.glob("map*.npy")) and (out / "stage1.npy").exists()


def test_fine_tuned_checkpoint_and_model_overrides(tmp_path, pretrained):
    """A classifier checkpoint (keys model.*, its config under hyper_parameters) loads without its head; a
    model.* override that changes widths is an error naming the key."""
    _, encoder = pretrained
    classifier = SwinTransformerV2(**MODEL, num_classes=10)
    classifier.load_state_dict(encoder.state_dict(), strict=False)
    ckpt = tmp_path / "ft.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in classifier.state_dict().items()},
                "hyper_parameters": {"model": {**MODEL, "num_classes": 10}}}, ckpt)
    extract_features.main([f"checkpoint={ckpt}", "data.source=digits", "data.split=val", f"out={tmp_path / 'f'}",
                           *FAST])
    features = torch.load(tmp_path / "f.pt", weights_only=False)
    assert features["layout"] == "lightning-classifier"
    expected = expected_pooled(encoder, digit_images(digits_split()[1][:2]))
    assert torch.allclose(features["pooled"][:2], expected, atol=1e-5)
    with pytest.raises(ConfigError, match=f"out={tmp_path / 'f.pt'}: the file exists; give another out= or add "):
        extract_features.main([f"checkpoint={ckpt}", "data.source=digits", f"out={tmp_path / 'f'}", *FAST])
    assert torch.load(tmp_path / "f.pt", weights_only=False)["layout"] == "lightning-classifier"

    with pytest.raises(ValueError, match="checkpoint does not match the model: .* is .*16.* in the checkpoint"):
        extract_features.main([f"checkpoint={ckpt}", "data.source=digits", "model.embed_dim=32", *FAST])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        extract_features.main([f"checkpoint={tmp_path / 'none.pth'}", "data.source=digits"])
    with pytest.raises(ConfigError, match="format=csv is not one of pt, npy"):
        extract_features.main([f"checkpoint={ckpt}", "format=csv"])
    with pytest.raises(ValueError, match="unknown device 'gpu0'; use auto, cpu, cuda or cuda:N"):
        extract_features.main([f"checkpoint={ckpt}", "device=gpu0"])
    with pytest.raises(FileNotFoundError, match="image folder .*nowhere does not exist"):
        extract_features.main([f"checkpoint={ckpt}", f"data.root={tmp_path / 'nowhere'}", *FAST])


def test_where_features_are_written(tmp_path):
    """format=pt adds .pt to out (it replaced a suffix: out=feats_0.5 wrote feats_0.pt) and writes into a folder
    out as features.pt (it wrote <folder>.pt beside it); format=npy refuses a .pt file name (it made a folder so
    named)."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.npy").write_bytes(b"")
    assert output_path(str(tmp_path / "feats_0.5"), "pt") == tmp_path / "feats_0.5.pt"
    assert output_path(str(tmp_path / "f.pt"), "pt") == tmp_path / "f.pt"
    assert output_path(str(tmp_path / "folder"), "pt") == tmp_path / "folder" / "features.pt"
    assert output_path(str(tmp_path / "folder"), "npy") == tmp_path / "folder"
    for out in ("f.pt", "file.npy"):
        with pytest.raises(ConfigError, match=rf"out=.*{out}: format=npy writes a folder of .npy files; pass "
                                              rf"out=FOLDER, or format=pt for one .pt file"):
            output_path(str(tmp_path / out), "npy")


def test_help_and_one_line_errors(capsys):
    extract_features.main(["--help"])
    assert "forward_intermediates" in capsys.readouterr().out
    result = run_script("simmim.tools.extract_features", "data.source=digits")
    assert result.returncode == 1 and result.stderr.startswith("error: checkpoint= is required")
    for arg, message in (("batch_size=0", "batch_size=0: expected an integer >= 1"),  # were torch's words
                         ("num_workers=-1", "num_workers=-1: expected an integer >= 0"),
                         ("maps=maybe", "maps=maybe: expected true or false")):
        result = run_script("simmim.tools.extract_features", "checkpoint=x.pth", arg)
        assert result.returncode == 1 and result.stderr.startswith(f"error: {message}"), result.stderr


def test_backbone_example():
    """The README's backbone example, verbatim, then a few steps: the head learns a per-pixel task."""
    from finetune.segmentation import StageSegmentationHead
    from simmim.models.swinv2 import build_swinv2

    encoder = build_swinv2("tiny", embed_dim=16, num_heads=[2, 2, 4, 8], img_size=64, window_size=4, num_classes=0)
    head = StageSegmentationHead(encoder.feature_info, num_classes=2)
    images = torch.randn(2, 3, 64, 64)
    _, maps = encoder.forward_intermediates(images)          # [(B, C_i, H / 4 / 2^i, W / 4 / 2^i)] per stage
    logits = head(maps, size=images.shape[-2:])               # (B, 2, 64, 64)

    assert logits.shape == (2, 2, 64, 64)
    assert [m.shape[1] for m in maps] == [info["num_chs"] for info in encoder.feature_info] == [16, 32, 64, 128]
    assert [64 // m.shape[-1] for m in maps] == [info["reduction"] for info in encoder.feature_info]
    # segment the brighter half of each image: left or right, at random
    gen = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=2e-3)
    losses = []
    for _ in range(15):
        right = torch.randint(0, 2, (4,), generator=gen).bool()
        target = torch.zeros(4, 64, 64, dtype=torch.long)
        target[right, :, 32:], target[~right, :, :32] = 1, 1
        images = torch.randn(4, 3, 64, 64, generator=gen) * 0.5 + target[:, None].float() * 2
        loss = F.cross_entropy(head(encoder.forward_intermediates(images)[1], size=(64, 64)), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
