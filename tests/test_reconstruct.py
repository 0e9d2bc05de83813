"""scripts/reconstruct.py: SimMIM reconstruction grids from our Lightning / exported and the official layouts."""
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import randomize_, run_script
from simmim.data.decode import read_image
from simmim.data.transforms import IMAGENET_MEAN, eval_transform
from simmim.pretrain import SimMIMPretrainModule, unnormalize

import simmim.tools.reconstruct as reconstruct

MODEL = dict(img_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
             drop_path_rate=0.0)
MASK_GRAY = np.round(np.array(IMAGENET_MEAN) * 255)  # a masked pixel: normalized 0, shown unnormalized
S = 32


@pytest.fixture(scope="module")
def module():
    return randomize_(SimMIMPretrainModule(model=MODEL, norm_target_patch_size=7), seed=5).eval()


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(str(folder / f"im{i}.png"), rng.integers(0, 256, (40, 56, 3), np.uint8))
    return folder


def checkpoints(module, tmp_path) -> dict:
    """Our three SimMIM layouts of the same weights, and the model.* arguments each needs."""
    lightning = tmp_path / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "datamodule_hyper_parameters": {"mask_patch_size": 8, "mask_kind": "random", "mask_ratio": 0.6}},
               lightning)
    exported = module.export_encoder(tmp_path / "encoder.pth", {"model": MODEL, "simmim": {
        "mask_patch_size": 8, "mask_kind": "random", "norm_target_patch_size": 7}})
    official = tmp_path / "official.pth"
    torch.save({"model": module.simmim.state_dict()}, official)  # no config: widths and masks by hand
    by_hand = ["model.img_size=32", "model.embed_dim=16", "model.depths=[2,2]", "model.num_heads=[2,4]",
               "model.window_size=4", "mask_patch_size=8", "norm_target_patch_size=7"]
    return {"lightning": (lightning, []), "exported": (exported, []), "official": (official, by_hand)}


def read_grid(path: Path) -> list[np.ndarray]:
    """The four columns of a reconstruction grid, RGB int arrays (N*S, S, 3)."""
    grid = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB).astype(int)
    return [grid[:, i * S:(i + 1) * S] for i in range(4)]


@pytest.mark.parametrize("layout", ["lightning", "exported", "official"])
def test_grid_shows_the_checkpoints_reconstruction(tmp_path, images, module, layout, capsys):
    ckpt, extra = checkpoints(module, tmp_path)[layout]
    out = tmp_path / "grid.png"
    reconstruct.main([f"checkpoint={ckpt}", f"images={images}", f"out={out}", "device=cpu", *extra])
    assert "3 images, 62% of patches masked" in capsys.readouterr().out
    original, masked, prediction, pasted = read_grid(out)
    assert original.shape == (3 * S, S, 3)

    paths = sorted(images.glob("*.png"))
    x = torch.stack([eval_transform(S)(image=read_image(p))["image"] for p in paths])
    shown = (unnormalize(x).permute(0, 2, 3, 1).reshape(-1, S, 3).numpy() * 255).round()
    assert np.abs(original - shown).max() <= 1

    # the mask, read off the picture: whole 8 px patches, 10 of the 16 per image (ceil(0.6 * 16))
    pixel_mask = np.all(masked == MASK_GRAY, axis=-1)
    assert np.array_equal(masked[~pixel_mask], original[~pixel_mask])
    patches = pixel_mask.reshape(3, 4, 8, 4, 8).transpose(0, 1, 3, 2, 4).reshape(3, 16, 64)
    assert np.all(patches.all(-1) == patches.any(-1)) and list(patches.all(-1).sum(1)) == [10, 10, 10]

    # the reconstruction is this module's, for that mask: its weights were loaded, norm targets mapped back
    token_mask = torch.from_numpy(pixel_mask.reshape(3, S, S)[:, ::4, ::4]).long()
    with torch.no_grad():
        expected = module.simmim.reconstruct_pixels(x, token_mask)
    expected = (unnormalize(expected).permute(0, 2, 3, 1).reshape(-1, S, 3).numpy() * 255).round()
    assert np.abs(prediction - expected).max() <= 1
    assert np.array_equal(pasted[pixel_mask], prediction[pixel_mask])
    assert np.array_equal(pasted[~pixel_mask], original[~pixel_mask])


def test_seed_picks_the_masks(tmp_path, images, module):
    ckpt, _ = checkpoints(module, tmp_path)["exported"]
    grids = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = tmp_path / f"{name}.png"
        reconstruct.main([f"checkpoint={ckpt}", f"images=[{images / 'im0.png'},{images / 'im2.png'}]",
                          f"seed={seed}", "mask_ratio=0.3", f"out={out}", "device=cpu"])
        grids[name] = read_grid(out)[1]
    assert grids["a"].shape == (2 * S, S, 3)
    assert np.array_equal(grids["a"], grids["b"]) and not np.array_equal(grids["a"], grids["c"])
    assert np.all(grids["a"] == MASK_GRAY, axis=-1).mean() == pytest.approx(5 / 16)  # ceil(0.3 * 16) patches


def test_checkpoint_without_decoder_and_bad_inputs(tmp_path, images, module):
    classifier = tmp_path / "ft.ckpt"
    torch.save({"state_dict": {f"model.{k.removeprefix('simmim.encoder.')}": v
                               for k, v in module.state_dict().items() if k.startswith("simmim.encoder.")}}, classifier)
    with pytest.raises(ValueError, match="a lightning-classifier checkpoint has no SimMIM decoder"):
        reconstruct.main([f"checkpoint={classifier}", f"images={images}"])
    ckpt, _ = checkpoints(module, tmp_path)["exported"]
    with pytest.raises(FileNotFoundError, match="image .*missing.png does not exist"):
        reconstruct.main([f"checkpoint={ckpt}", f"images=[{images / 'im0.png'},{images / 'missing.png'}]"])
    with pytest.raises(ValueError, match="encoder.mask_token is .*16.* in the checkpoint"):
        reconstruct.main([f"checkpoint={ckpt}", f"images={images}", "model.embed_dim=32"])

    (tmp_path / "mine.png").write_bytes(b"the user's picture")
    for argv, message in (([f"out={tmp_path}"], f"out={tmp_path}: expected a picture file to write"),
                          ([f"out={tmp_path / 'mine.png'}"], "mine.png: the file exists; give another out= or add "
                                                             "overwrite=true"),  # was replaced without a word
                          ([f"out={images / 'im0.png'}", "overwrite=true"], "im0.png is one of the images; give "
                                                                            "another out="),
                          ([f"out={tmp_path / 'grid.txt'}"], "grid.txt: expected a picture file to write"),
                          (["max_images=0"], "max_images=0: expected an integer >= 1"),
                          (["mask_patch_size=6"], r"mask_patch_size=6: expected a divisor of the model's img_size "
                                                  r"32 that is a multiple of its patch_size 4, one of 4, 8, 16, 32"),
                          (["norm_target_patch_size=4"],
                           "norm_target_patch_size=4: expected an odd window of pixels >= 3"),
                          (["seed=abc"], "seed=abc: expected an integer")):
        with pytest.raises(ValueError, match=message):  # not cv2's or the mask generator's words, not a traceback
            reconstruct.main([f"checkpoint={ckpt}", f"images={images}", *argv])
    assert (tmp_path / "mine.png").read_bytes() == b"the user's picture"

    reconstruct.main(["--help"])
    missing = tmp_path / "none.pth"
    result = run_script("simmim.tools.reconstruct", f"checkpoint={missing}", f"images={images}")
    assert result.returncode == 1 and result.stderr == (f"error: checkpoint {missing} does not exist; pass the path "
                                                        f"of a .ckpt, .pth or .safetensors file or of a transformers "
                                                        f"Swinv2 folder\n")


def test_undecodable_files_are_skipped_with_a_count(tmp_path, images, module):
    ckpt, _ = checkpoints(module, tmp_path)["exported"]
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "grid.png"
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable images of 4 under .*images \(first: .*broken.png\)"):
        reconstruct.main([f"checkpoint={ckpt}", f"images={images}", f"out={out}", "device=cpu"])
    assert len(read_grid(out)[0]) == 3 * S
    for name in ("im0.png", "im1.png", "im2.png"):
        (images / name).write_bytes(b"")
    with pytest.raises(ValueError, match="no readable images under .*images; all 4 files failed to decode"):
        reconstruct.main([f"checkpoint={ckpt}", f"images={images}", f"out={out}", "device=cpu", "overwrite=true"])
