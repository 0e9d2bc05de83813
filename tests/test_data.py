import os
import time
import warnings
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from albumentations.pytorch import ToTensorV2
from lightning_utilities.core.rank_zero import rank_zero_only
from torch.utils.data import DataLoader

from simmim.data import datasets, sources
from simmim.data.datamodule import SimMIMDataModule
from simmim.data.datasets import EpochSampler, ImageDataset, labeled_datasets
from simmim.data.decode import decode_image, decode_needs, read_image
from simmim.data.sources import FileList, build_source, build_sources, digits_split, labels_per_class_subset
from simmim.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, TrainAugment, eval_transform, finetune_transform,
                                    normalize_images, pretrain_transform)

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
SMALL = dict(img_size=32, mask_patch_size=8, model_patch_size=4)  # 8x8 token grid


def write_png(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


def color_image(seed=0, shape=(20, 30, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def write_truncated_jpg(path):
    write_png(path, color_image(shape=(40, 40, 3)))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


# ------------------------------------------------------------------------------------------------ transforms
def pixels_of(out: torch.Tensor) -> torch.Tensor:
    """A transform's output as [0, 1] pixels (3, H, W): uint8 (H, W, 3) (`TrainAugment`) or normalized float."""
    return out.permute(2, 0, 1) / 255 if out.dtype == torch.uint8 else out * STD + MEAN


def test_eval_transform_gives_normalized_float_tensors():
    out = eval_transform(32)(image=color_image(shape=(50, 70, 3)))["image"]
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    pixels = out * STD + MEAN
    assert pixels.min() >= -1e-4 and pixels.max() <= 1 + 1e-4
    assert pixels.std() > 0.1  # not a constant image


@pytest.mark.parametrize("make, interpolation", [(pretrain_transform, cv2.INTER_LINEAR),
                                                  (finetune_transform, cv2.INTER_CUBIC)])
def test_train_augments_give_uint8_that_the_device_normalizes_like_the_float_transforms(make, interpolation):
    image = color_image(shape=(50, 70, 3))
    out = make(32)(image=image)["image"]
    assert out.shape == (32, 32, 3) and out.dtype == torch.uint8 and out.float().std() > 20  # channels last
    whole = make(50, crop_scale=(1.0, 1.0), crop_ratio=(1.4, 1.4), hflip=0.0)  # 70 x 50 is 1.4
    normalized = normalize_images(torch.stack([whole(image=image)["image"]]))[0]
    assert normalized.dtype == torch.float32 and normalized.shape == (3, 50, 50)
    resized = A.Compose([A.Resize(50, 50, interpolation=interpolation),
                         A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD), ToTensorV2()])
    assert torch.allclose(normalized, resized(image=image)["image"], atol=1e-5)  # as albumentations would


def test_train_augment_draws_crops_within_its_scale_and_ratio():
    crop = TrainAugment(16, scale=(0.3, 0.6), ratio=(0.8, 1.25))  # every draw fits a 300 x 400 image
    crop.set_random_seed(0)
    boxes = [crop.box(300, 400) for _ in range(2000)]
    for top, left, h, w in boxes:
        assert 0 <= top <= 300 - h and 0 <= left <= 400 - w
        assert 0.3 - 0.01 <= h * w / 120_000 <= 0.6 + 0.01 and 0.8 - 0.01 <= w / h <= 1.25 + 0.01
    areas = np.array([h * w for _, _, h, w in boxes]) / 120_000
    assert abs(areas.mean() - 0.45) < 0.01 and abs((areas < 0.375).mean() - 0.25) < 0.04  # uniform in area
    log_ratios = np.log([w / h for _, _, h, w in boxes])
    assert abs(np.median(log_ratios)) < 0.02 and abs((log_ratios < np.log(0.8) / 2).mean() - 0.25) < 0.04
    # no fitting crop (a 1:10 strip, ratios 3/4-4/3): the largest centered crop of the nearest allowed ratio
    strip = TrainAugment(16, scale=(0.9, 1.0), ratio=(0.75, 4 / 3))
    assert strip.box(10, 100) == (0, 43, 10, 13)
    assert strip.box(100, 10) == (43, 0, 13, 10)
    crop.set_random_seed(0)
    assert [crop.box(300, 400) for _ in range(5)] == boxes[:5]  # the seed decides


def test_eval_transform_keeps_colors_in_rgb_order():
    image = np.empty((40, 60, 3), np.uint8)
    image[:] = (10, 128, 250)
    pixels = eval_transform(16)(image=image)["image"] * STD + MEAN
    assert torch.allclose(pixels.mean((1, 2)), torch.tensor([10, 128, 250]) / 255, atol=1e-3)


# ------------------------------------------------------------------------------------------------ reading
def test_read_image_converts_formats(tmp_path):
    bgr = np.zeros((6, 5, 3), np.uint8)
    bgr[..., 0] = 200  # blue in OpenCV's order
    assert (read_image(write_png(tmp_path / "blue.png", bgr))[..., 2] == 200).all()
    assert (read_image(write_png(tmp_path / "blue.png", bgr))[..., 0] == 0).all()

    gray = np.arange(30, dtype=np.uint8).reshape(5, 6)
    out = read_image(write_png(tmp_path / "gray.png", gray))
    assert out.shape == (5, 6, 3) and out.dtype == np.uint8 and (out == gray[..., None]).all()

    deep = np.full((4, 4, 3), 257 * 100, np.uint16)
    deep[0, 0] = 65535
    out = read_image(write_png(tmp_path / "deep.png", deep))
    assert out.dtype == np.uint8 and out[0, 0, 0] == 255 and out[1, 1, 0] == 100

    bgra = np.full((4, 4, 4), 255, np.uint8)
    bgra[0, :, 3] = 0  # first row transparent: composited onto black
    out = read_image(write_png(tmp_path / "rgba.png", bgra))
    assert out.shape == (4, 4, 3) and (out[0] == 0).all() and (out[1:] == 255).all()


def test_read_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="cannot decode"):
        read_image(write_truncated_jpg(tmp_path / "cut.jpg"))
    (tmp_path / "noise.png").write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(ValueError, match="cannot decode"):
        read_image(tmp_path / "noise.png")


def smooth_jpeg(shape, quality=90):
    image = cv2.GaussianBlur(color_image(7, shape), (0, 0), 4)
    return image, cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def with_exif_orientation(jpeg: bytes, orientation: int, order: str = "little") -> bytes:
    """The JPEG with an APP1 Exif segment whose IFD0 holds Orientation (tag 0x0112, SHORT)."""
    short, long_ = (lambda v: v.to_bytes(2, order)), (lambda v: v.to_bytes(4, order))
    tiff = (b"II*\0" if order == "little" else b"MM\0*") + long_(8) + short(1)
    tiff += short(0x0112) + short(3) + long_(1) + short(orientation) + b"\0\0" + long_(0)
    segment = b"Exif\0\0" + tiff
    return jpeg[:2] + b"\xff\xe1" + (len(segment) + 2).to_bytes(2, "big") + segment + jpeg[2:]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_opencv(orientation):
    """OpenCV's IMREAD_COLOR applies EXIF orientation itself: an independent reference."""
    _, jpeg = smooth_jpeg((30, 40, 3))
    for order in ("little", "big"):
        encoded = with_exif_orientation(jpeg, orientation, order)
        expected = cv2.cvtColor(cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        out = decode_image(encoded)
        assert out.shape == expected.shape == ((30, 40, 3) if orientation < 5 else (40, 30, 3))
        assert np.abs(out.astype(int) - expected).max() <= 2  # two libjpeg builds: rounding may differ


def test_jpegs_decode_at_reduced_scale_when_the_crop_allows():
    image, jpeg = smooth_jpeg((1200, 1600, 3))
    full = decode_image(jpeg)
    assert full.shape == (1200, 1600, 3) and np.abs(full.astype(int) - image[..., ::-1]).mean() < 2
    needs = decode_needs(pretrain_transform(192))  # short side >= 192, area >= 192^2 / (0.67 * 3/4)
    reduced = decode_image(jpeg, **needs)
    assert reduced.shape == (300, 400, 3)  # 1/4: 1/8 would leave a 150 px short side
    area = cv2.resize(full, (400, 300), interpolation=cv2.INTER_AREA)
    assert np.abs(reduced.astype(int) - area).mean() < 1.5  # DCT scaling ~ an area resize of the full decode
    assert decode_image(jpeg, **decode_needs(finetune_transform(224))).shape == full.shape  # small crops: full
    assert decode_image(jpeg, **decode_needs(eval_transform(224))).shape == (300, 400, 3)  # short side >= 256
    assert decode_image(jpeg, **decode_needs(eval_transform(320))).shape == (600, 800, 3)  # short side >= 366
    gray = decode_image(cv2.imencode(".jpg", image[..., 0])[1].tobytes(), min_short=100)
    assert gray.shape == (150, 200, 3) and (gray[..., 0] == gray[..., 2]).all()
    with pytest.raises(ValueError, match="cannot decode image x.jpg"):
        decode_image(jpeg[:len(jpeg) // 2], "x.jpg", **needs)


# ------------------------------------------------------------------------------------------------ digits
def test_digits_split_is_fixed_stratified_and_disjoint():
    train, val = digits_split()
    assert len(train) + len(val) == 1797 and len(val) == 360
    assert not set(train) & set(val)
    again = digits_split()
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])

    train_samples, val_samples = build_sources("digits", img_size=24)
    assert len(train_samples) == len(train) and len(val_samples) == len(val)
    val_counts = np.bincount([label for _, label in val_samples], minlength=10)
    assert set(np.nonzero(val_counts)[0]) == set(range(10)) and val_counts.min() >= 34 and val_counts.max() <= 37
    image, _ = val_samples[0]
    assert image.shape == (24, 24) and image.dtype == np.uint8 and image.max() > 200
    assert [label for _, label in build_source("digits", "val", 24)] == [label for _, label in val_samples]


def test_digits_datasets_reach_img_size():
    train, val = labeled_datasets("digits", img_size=24)
    for dataset, shape in ((train, (24, 24, 3)), (val, (3, 24, 24))):  # train: uint8 channels last
        image, label = dataset[5]
        assert image.shape == shape and isinstance(label, int) and 0 <= label <= 9


# ------------------------------------------------------------------------------------------------ folder / list
def make_class_folder(root):
    """zebra/ written before ant/; 5 readable images of several formats, 2 corrupt ones and a text file."""
    write_png(root / "zebra" / "color.png", color_image(1))
    write_png(root / "zebra" / "gray.png", color_image(2)[..., 0])
    write_png(root / "zebra" / "nested" / "deep16.PNG", (color_image(3).astype(np.uint16) * 257))
    write_truncated_jpg(root / "zebra" / "cut.jpg")
    write_png(root / "ant" / "rgba.png", color_image(4, shape=(20, 30, 4)))
    write_png(root / "ant" / "photo.JPG", color_image(5))
    (root / "ant" / "noise.webp").write_bytes(np.random.default_rng(0).bytes(200))
    (root / "ant" / "notes.txt").write_text("not an image")


def test_folder_source_with_verify_skips_corrupt_files_with_one_warning(tmp_path, monkeypatch):
    make_class_folder(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train, val = build_sources("folder", 32, root=tmp_path, verify=True)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"skipped 2 unreadable images of 7 under {tmp_path} (first: ")
    assert "noise.webp" in messages[0] or "cut.jpg" in messages[0]

    labels = {path.split("/")[-1]: label for path, label in [*train, *val]}
    assert labels == {"rgba.png": 0, "photo.JPG": 0, "color.png": 1, "gray.png": 1, "deep16.PNG": 1}
    with pytest.warns(UserWarning, match="skipped 2"):
        again = build_sources("folder", 32, root=tmp_path, verify=True)
    assert [list(split) for split in again] == [list(train), list(val)]  # fixed hold-out
    monkeypatch.setattr(rank_zero_only, "rank", 1)  # every rank verifies: rank 0 alone says it (every rank did)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_sources("folder", 32, root=tmp_path, verify=True)
    assert not caught

    dataset = ImageDataset([*train, *val], pretrain_transform(32))
    assert all(dataset[i][0].shape == (32, 32, 3) for i in range(len(dataset)))


def test_folder_source_lists_without_decoding_and_replaces_bad_files_when_read(tmp_path, monkeypatch):
    make_class_folder(tmp_path)
    decoded = []
    for module in (sources, datasets):  # where setup (data.verify) and the datasets decode
        monkeypatch.setattr(module, "read_image",
                            lambda path, **needs: decoded.append(path) or read_image(path, **needs))
    train, val = build_sources("folder", 32, root=tmp_path)
    assert decoded == [] and isinstance(train, FileList) and len(train) + len(val) == 7
    verified = build_sources("folder", 32, root=tmp_path, verify=True)
    assert {p for p, _ in verified[1]} <= {p for p, _ in val}  # the split does not depend on verify

    dataset = ImageDataset([*train, *val], eval_transform(32))
    with pytest.warns(UserWarning, match=r"skipped 1 undecodable images so far.*data/skipped.*(cut.jpg|noise.webp)"):
        items = [dataset[i] for i in range(len(dataset))]
    assert dataset.skipped.total == 2 and all(image.shape == (3, 32, 32) for image, _ in items)
    bad = [i for i, (path, _) in enumerate(dataset.samples) if path.endswith(("cut.jpg", "noise.webp"))]
    good = {path: i for i, (path, _) in enumerate(dataset.samples) if i not in bad}
    for i in bad:  # replaced by a good sample, the same one every time
        assert torch.equal(dataset[i][0], items[i][0])
        assert any(torch.equal(items[i][0], items[j][0]) for j in good.values())
    assert dataset.skipped.total == 4


def test_every_file_bad_is_a_clear_error(tmp_path):
    """Every file of a split unreadable: a small split (the one image a 20-image folder holds out) is named so,
    with and without data.verify (it said "101 files in a row failed", trying the one file 101 times)."""
    for i in range(120):
        write_truncated_jpg(tmp_path / "many" / f"{i}.jpg")
    train, _ = build_sources("folder", 32, root=tmp_path / "many")
    with pytest.raises(ValueError, match="101 files in a row failed to decode"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ImageDataset(train, eval_transform(32))[0]
    for i in range(20):
        write_png(tmp_path / "few" / f"{i:02d}.png", color_image(i))
    _, val = build_sources("folder", 32, root=tmp_path / "few")
    write_truncated_jpg(Path(val.path(0)))  # the one image held out (the split does not depend on the files)
    with pytest.raises(ValueError, match=r"101 tries over the 1 file\(s\) of a split all failed to decode "
                                         r"\(last: .*\); "
                                         r"a folder or list "
                                         r"of few images holds out few for validation"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ImageDataset(val, eval_transform(32))[0]
    with pytest.raises(ValueError, match=r"no readable images in the validation split of .*few: all 1 of its files "
                                         r"failed to decode \(first: .*\); a folder or list of few images"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_sources("folder", 32, root=tmp_path / "few", verify=True)


def test_skip_counter_counts_over_workers():
    """Two workers each hit a missing file; the counter in shared memory sees both."""
    samples = FileList(["/nonexistent/a.png", "/nonexistent/b.png"], [0, 0])
    dataset = ImageDataset([*samples] + [(color_image(), 0)] * 2, eval_transform(16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        list(DataLoader(torch.utils.data.Subset(dataset, [0, 1]), batch_size=1, num_workers=2))
    assert dataset.skipped.total >= 2


def test_file_list_holds_paths_in_numpy_arrays():
    paths = ["/a/b.png", "/ü/ç d.jpg", "rel/x.webp"]
    samples = FileList(paths, [3, 0, 7])
    assert list(samples) == [("/a/b.png", 3), ("/ü/ç d.jpg", 0), ("rel/x.webp", 7)] and len(samples) == 3
    assert isinstance(samples.data, np.ndarray) and samples.data.dtype == np.uint8
    assert list(samples.subset(np.array([2, 0]))) == [("rel/x.webp", 7), ("/a/b.png", 3)]
    assert ImageDataset(samples, eval_transform(16)).samples is samples


def test_folder_with_train_and_val_subfolders(tmp_path):
    for split, count in (("train", 3), ("val", 2)):
        for cls in ("b", "a"):
            for i in range(count):
                write_png(tmp_path / split / cls / f"{i}.png", color_image(i))
    train, val = build_sources("folder", 32, root=tmp_path)
    assert len(train) == 6 and len(val) == 4
    assert all("/train/" in path and label == "ab".index(path.split("/")[-2]) for path, label in train)
    assert all("/val/" in path and label == "ab".index(path.split("/")[-2]) for path, label in val)

    write_png(tmp_path / "val" / "c" / "0.png", color_image())
    with pytest.raises(ValueError, match="outside the train class folders"):
        build_sources("folder", 32, root=tmp_path)


def test_folder_layouts_that_would_label_wrongly_are_named(tmp_path):
    """train/ + validation/ is a train / validation layout (its folders were two classes, validation images mixed
    into training); train/ + test/ is warned of; a class folder without images is named (the classes after it
    were renumbered without a word); a link back up the tree lists its images once (each was listed ~40 times,
    some under another class)."""
    for split in ("train", "validation"):
        for cls in ("a", "b"):
            write_png(tmp_path / "tv" / split / cls / "0.png", color_image())
    train, val = build_sources("folder", 32, root=tmp_path / "tv")
    assert [label for _, label in train] == [0, 1] and all("/validation/" in path for path, _ in val)
    (tmp_path / "tv" / "validation").rename(tmp_path / "tv" / "test")
    with pytest.warns(UserWarning, match=r"tv has a train/ folder but no val/ or validation/ beside it, so its folders "
                                         r"\(test, train\) are taken as classes"):
        build_sources("folder", 32, root=tmp_path / "tv")

    for cls in ("a", "c"):
        for i in range(3):
            write_png(tmp_path / "classes" / cls / f"{i}.png", color_image(i))
    (tmp_path / "classes" / "b").mkdir()
    (tmp_path / "classes" / "b" / "x.gif").write_bytes(b"GIF89a")
    with pytest.warns(UserWarning, match=r"1 folder\(s\) of .*classes hold no images \(b\): they are no class; labels "
                                         r"number the 2 folders with images \(a=0, c=1\)"):
        build_sources("folder", 32, root=tmp_path / "classes")

    (tmp_path / "classes" / "a" / "up").symlink_to("..")
    with pytest.warns(UserWarning, match=r"1 linked folder\(s\) under .*classes lead to a folder listed already "
                                         r"\(first: "
                                         r".*classes/a/up -> .*classes\)"):
        train, val = build_sources("folder", 32, root=tmp_path / "classes")
    labels = {path.removeprefix(str(tmp_path / "classes")): label for path, label in [*train, *val]}
    assert labels == {f"/{cls}/{i}.png": "ac".index(cls) for cls in "ac" for i in range(3)}


def test_folder_images_at_top_level_get_label_zero(tmp_path):
    for i in range(3):
        write_png(tmp_path / f"{i}.png", color_image(i))
    write_png(tmp_path / "sub" / "x.png", color_image())
    with pytest.warns(UserWarning, match=r"3 image\(s\) at the top of .* \(first: 0.png\) beside 1 subfolder\(s\) "
                                         r"\(sub\): every label is 0; move them into a class folder"):
        train, val = build_sources("folder", 32, root=tmp_path)  # was silent: a stray file cost every label
    assert len(train) == 3 and len(val) == 1 and {label for _, label in [*train, *val]} == {0}


def test_list_source(tmp_path):
    write_png(tmp_path / "imgs" / "a.png", color_image(1))
    write_png(tmp_path / "imgs" / "my b.png", color_image(2))
    absolute = write_png(tmp_path / "elsewhere" / "c.png", color_image(3))
    write_truncated_jpg(tmp_path / "imgs" / "cut.jpg")
    list_file = tmp_path / "lists" / "train.txt"
    list_file.parent.mkdir()
    list_file.write_text(f"\ufeff# path label\n../imgs/a.png 3\n\n../imgs/my b.png\t7\n  {absolute} 0\n"
                         f"../imgs/cut.jpg 1\n")  # with a byte order mark, as Notepad and Excel save (was a path)
    with pytest.warns(UserWarning, match="skipped 1 unreadable images of 4"):
        train, val = build_sources("list", 32, list_file=list_file, verify=True)
    labels = {path.split("/")[-1]: label for path, label in [*train, *val]}
    assert labels == {"a.png": 3, "my b.png": 7, "c.png": 0} and len(val) == 1
    assert all(ImageDataset(train, eval_transform(32))[i][0].shape == (3, 32, 32) for i in range(len(train)))

    # a list without labels: all 0; a line without a label among labeled ones is refused (it was class 0, silently)
    list_file.write_text(f"\ufeff../imgs/a.png\n{absolute}\n")
    assert [label for _, label in build_sources("list", 32, list_file=list_file)[0]] == [0]
    list_file.write_text(f"../imgs/a.png 3\n../imgs/my b.png 7\n{absolute}\n")
    with pytest.raises(ValueError, match=r"train.txt line 3 has no label while 2 other line\(s\) have one "
                                         r"\(1 without\); "
                                         r"give every line a class index, or none"):
        build_sources("list", 32, list_file=list_file)


def test_listed_files_that_do_not_exist_are_found_when_the_list_is_read(tmp_path, monkeypatch):
    """Paths relative to the working directory (a list's are relative to its folder): none exists is one line at
    setup (was "101 files in a row failed to decode" in training); some missing are warned of."""
    write_png(tmp_path / "imgs" / "a.png", color_image(1))
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "cwd.txt").write_text("imgs/a.png 0\nimgs/b.png 1\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"none of 2 files of .*cwd.txt tried exists \(first: "
                                                r".*lists/imgs/\w.png"
                                                r"\); a list's relative paths are relative to the list file's folder"):
        build_sources("list", 32, list_file="lists/cwd.txt")
    (tmp_path / "some.txt").write_text("imgs/a.png 0\nimgs/gone.png 1\n")
    with pytest.warns(UserWarning, match=r"1 of 2 files of some.txt tried do not exist \(first: .*gone.png\): "
                                         r"they will "
                                         r"be skipped as unreadable"):
        build_sources("list", 32, list_file="some.txt")


def test_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images .* under .*empty"):
        build_sources("folder", 32, root=tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="image folder .*missing does not exist"):
        build_sources("folder", 32, root=tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="image list .*missing.txt does not exist"):
        build_sources("list", 32, list_file=tmp_path / "missing.txt")
    (tmp_path / "comments.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="names no images"):
        build_sources("list", 32, list_file=tmp_path / "comments.txt")
    write_truncated_jpg(tmp_path / "bad" / "cut.jpg")
    write_truncated_jpg(tmp_path / "bad" / "cut2.jpg")
    with pytest.raises(ValueError, match="no readable images in the train split of .*bad"), pytest.warns(UserWarning):
        build_sources("folder", 32, root=tmp_path / "bad", verify=True)
    with pytest.raises(ValueError, match="unknown data source 'imagenet'"):
        build_sources("imagenet", 32)
    with pytest.raises(FileNotFoundError, match="image folder .*missing does not exist"):
        SimMIMDataModule(source="folder", root=str(tmp_path / "missing")).setup("fit")


# ------------------------------------------------------------------------------------------------ masks
def masked_digits(seed=0):
    dm = SimMIMDataModule(seed=seed, batch_size=8, **SMALL)
    dm.setup("fit")
    return dm


def test_masks_depend_only_on_seed_epoch_index():
    dataset = masked_digits().train_set
    image, mask, label = dataset[(3, 1)]
    assert image.shape == (32, 32, 3) and mask.shape == (8, 8) and mask.dtype == torch.int64
    assert set(mask.unique().tolist()) == {0, 1} and isinstance(label, int)
    assert torch.equal(dataset[(3, 1)][1], mask)
    assert torch.equal(dataset[3][1], dataset[(3, 0)][1])
    for index in range(5):
        assert not torch.equal(dataset[(index, 0)][1], dataset[(index, 1)][1])
    assert not torch.equal(masked_digits(seed=1).train_set[(3, 1)][1], mask)
    assert torch.equal(masked_digits().train_set[(3, 1)][1], mask)


def test_epoch_sampler():
    sampler = EpochSampler(10, shuffle=True, seed=4)
    assert len(sampler) == 10
    first = list(sampler)
    assert sorted(index for index, _ in first) == list(range(10)) and {epoch for _, epoch in first} == {0}
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(index for index, _ in second) == list(range(10)) and {epoch for _, epoch in second} == {1}
    assert [i for i, _ in first] != [i for i, _ in second]
    sampler.set_epoch(0)
    assert list(sampler) == first == list(EpochSampler(10, shuffle=True, seed=4))

    ordered = EpochSampler(4, shuffle=False)
    ordered.set_epoch(2)
    assert list(ordered) == [(0, 2), (1, 2), (2, 2), (3, 2)]
    fixed = EpochSampler(3, shuffle=False, fixed_epoch=0)
    fixed.set_epoch(5)
    assert list(fixed) == [(0, 0), (1, 0), (2, 0)]


def test_a_resumed_sampler_draws_the_checkpoints_epoch_first():
    """Resumed from an end-of-epoch checkpoint with DataLoader workers, the loader asks for the indices before the
    trainer counts the next epoch: the resumed epoch was drawn as the one before (its order, crops and masks), and
    the run differed from one never killed (k-NN 0.925 vs 0.919 by hand). The checkpoint's epoch comes first."""
    trainer_epoch = [2]  # the trainer's count when the workers first ask: still the epoch the checkpoint ended
    sampler = EpochSampler(10, shuffle=True, seed=4, epoch_fn=lambda: trainer_epoch[0])
    sampler.resume(3, 0)
    reference = EpochSampler(10, shuffle=True, seed=4)
    reference.set_epoch(3)
    assert list(sampler) == list(reference)  # epoch 3, whole
    trainer_epoch[0] = 4
    reference.set_epoch(4)
    assert list(sampler) == list(reference)  # then the trainer's epochs
    sampler.resume(4, 6)  # mid-epoch: the rest of epoch 4
    assert list(sampler) == list(reference)[6:]


def expected_masks(dataset, items):
    return torch.stack([torch.from_numpy(dataset.mask_generator(np.random.default_rng([dataset.seed, e, i])))
                        for i, e in items])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_datamodule_batches_match_direct_masks(num_workers):
    dm = SimMIMDataModule(batch_size=8, num_workers=num_workers, seed=3, **SMALL)
    dm.setup("fit")
    assert dm.hparams.img_size == 32 and dm.hparams.num_workers == num_workers
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(2)
    items = list(loader.sampler)
    batches = [batch for batch, _ in zip(loader, range(3))]
    images, masks, labels = batches[0]
    assert images.shape == (8, 32, 32, 3) and images.dtype == torch.uint8  # normalized on the device
    assert masks.shape == (8, 8, 8) and masks.dtype == torch.int64
    assert labels.shape == (8,) and labels.dtype == torch.int64 and 0 <= labels.min() <= labels.max() <= 9
    assert torch.equal(torch.cat([b[1] for b in batches]), expected_masks(dm.train_set, items[:24]))
    assert len(loader) == len(dm.train_set) // 8  # drop_last

    val = dm.val_dataloader()
    val.sampler.set_epoch(7)  # ignored: val masks stay at epoch 0
    _, val_masks, _ = next(iter(val))
    assert torch.equal(val_masks, expected_masks(dm.val_set, [(i, 0) for i in range(8)]))


def test_augmentations_differ_across_workers_and_epochs():
    """albumentations' own RNG is copied into every forked worker; ImageDataset must reseed it per worker."""
    dataset = ImageDataset([(color_image(shape=(40, 40, 3)), 0)] * 4, pretrain_transform(16))
    loader = DataLoader(dataset, batch_size=1, num_workers=2)
    images = [image[0] for _ in range(2) for image, _ in loader]
    assert len(images) == 8
    assert all(not torch.equal(images[i], images[j]) for i in range(8) for j in range(i))


class MaskRecorder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.train_masks, self.val_masks = {}, {}

    def training_step(self, batch, batch_idx):
        self.train_masks.setdefault(self.current_epoch, batch[1])
        return self.weight * batch[0].float().mean()

    def validation_step(self, batch, batch_idx):
        self.val_masks.setdefault(self.current_epoch, batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_feeds_the_epoch_to_the_sampler():
    dm = SimMIMDataModule(batch_size=4, seed=1, **SMALL)
    model = MaskRecorder()
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, datamodule=dm)
    for epoch in (0, 1):
        order = torch.randperm(len(dm.train_set), generator=torch.Generator().manual_seed(1 + epoch))[:4]
        assert torch.equal(model.train_masks[epoch], expected_masks(dm.train_set, [(i, epoch) for i in order.tolist()]))
    assert not torch.equal(model.train_masks[0], model.train_masks[1])
    assert torch.equal(model.val_masks[0], model.val_masks[1])
    assert torch.equal(model.val_masks[0], expected_masks(dm.val_set, [(i, 0) for i in range(4)]))


def test_folder_start_does_not_grow_with_the_number_of_files(tmp_path, monkeypatch):
    """1,500 files reach the first batch about as fast as 15: setup only lists them, the batch decodes its own."""
    image = cv2.GaussianBlur(color_image(shape=(1000, 1500, 3)), (0, 0), 2)  # a batch decode of ~0.1 s
    original = write_png(tmp_path / "original.jpg", image)
    for count in (15, 1500):
        for i in range(count):  # hard links: 1,500 files without 1,500 copies on disk
            path = tmp_path / str(count) / f"class{i % 3}" / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            os.link(original, path)
    decoded = []
    for module in (sources, datasets):  # where setup (data.verify) and the datasets decode
        monkeypatch.setattr(module, "read_image",
                            lambda path, **needs: decoded.append(path) or read_image(path, **needs))

    def first_batch(count):  # CPU seconds of this process: other jobs on a shared machine barely change them
        decoded.clear()
        start = time.process_time()
        dm = SimMIMDataModule(source="folder", root=str(tmp_path / str(count)), batch_size=12, **SMALL)
        dm.setup("fit")
        assert decoded == []  # nothing decoded at setup
        images, _, _ = next(iter(dm.train_dataloader()))
        assert images.shape == (12, 32, 32, 3) and len(decoded) == 12
        return time.process_time() - start

    seconds = {15: [], 1500: []}
    for _ in range(5):  # interleaved, best of 5
        for count in seconds:
            seconds[count].append(first_batch(count))
    assert min(seconds[1500]) < 1.5 * min(seconds[15]), seconds
# ------------------------------------------------------------------------------------------------ augmentation keys
def test_crop_and_flip_keys_reach_the_transforms():
    image = color_image(shape=(32, 32, 3))
    for make in (pretrain_transform, finetune_transform):
        plain = eval_transform(32)  # at 32 px the eval transform resizes to 37 and center-crops: not the input
        kept = make(32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0)
        flipped = make(32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=1.0)
        expected = torch.from_numpy(image).permute(2, 0, 1) / 255
        for _ in range(3):
            assert torch.allclose(pixels_of(kept(image=image)["image"]), expected, atol=1e-5)
            assert torch.allclose(pixels_of(flipped(image=image)["image"]), expected.flip(2), atol=1e-5)
        assert not torch.allclose(pixels_of(plain(image=image)["image"]), expected, atol=1e-2)
        # a small crop range gives crops of about that area: the same 8x8 checkerboard cell covers more pixels
        board = np.kron((np.indices((8, 8)).sum(0) % 2) * 255, np.ones((16, 16))).astype(np.uint8)
        board = np.repeat(board[..., None], 3, axis=2)
        small = make(128, crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0), hflip=0.0)(image=board)["image"]
        row = (pixels_of(small)[0, 64] > 0.5).numpy()
        assert np.count_nonzero(row[1:] != row[:-1]) <= 5  # 4 cells of 32 px in a row (whole image: 8 of 16)


def test_datamodule_and_labeled_datasets_use_the_augmentation_keys():
    dm = SimMIMDataModule(batch_size=4, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=1.0, **SMALL)
    dm.setup()
    (image, _), (source, _) = dm.train_set.dataset[0], dm.train_set.dataset.samples[0]
    source = np.repeat(source[..., None], 3, axis=2)
    assert torch.equal(image, torch.from_numpy(source).flip(1))
    train, _ = labeled_datasets("digits", img_size=32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=1.0)
    assert torch.allclose(pixels_of(train[0][0]), pixels_of(image), atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(crop_scale=(0.5, 0.2)), r"data.crop_scale=\[0.5, 0.2\] must be \[min, max\]"),
    (dict(crop_scale=(0.0, 1.0)), r"data.crop_scale=\[0.0, 1.0\]"),
    (dict(crop_scale=(0.5,)), r"data.crop_scale=\[0.5\]"),
    (dict(crop_ratio=(2.0, 1.0)), r"data.crop_ratio=\[2.0, 1.0\] must be \[min, max\]"),
    (dict(hflip=1.5), r"data.hflip=1.5 must be a probability"),
])
def test_bad_augmentation_keys_are_named(kwargs, message):
    for make in (pretrain_transform, finetune_transform):
        with pytest.raises(ValueError, match=message):
            make(32, **kwargs)


def test_labels_per_class_draws_the_same_subset_for_a_seed():
    full, _ = build_sources("digits", 16)
    subsets = {seed: labels_per_class_subset(full, 10, seed) for seed in (0, 1)}
    for subset in subsets.values():
        labels = [label for _, label in subset]
        assert len(subset) == 100 and all(labels.count(c) == 10 for c in range(10))
        assert {id(image) for image, _ in subset} <= {id(image) for image, _ in full}  # drawn from train
    index = lambda subset: {id(image) for image, _ in subset}
    assert index(labels_per_class_subset(full, 10, 0)) == index(subsets[0])  # both arms of a seed: one subset
    assert index(subsets[0]) != index(subsets[1])
    few = [(f"a{i}", 0) for i in range(3)] + [("b", 1)]
    picked = labels_per_class_subset(few, 2)  # a class with fewer images than asked keeps them all
    assert [label for _, label in picked] == [0, 0, 1] and set(picked) <= set(few)
    with pytest.warns(UserWarning, match=r"data.labels_per_class=5: no class has more than 3 training images; every "
                                         r"image is used"):
        assert len(labels_per_class_subset(few, 5)) == 4
    train, val = labeled_datasets("digits", img_size=16, labels_per_class=3, seed=2)
    assert len(train) == 30 and len(val) == 360
    with pytest.raises(ValueError, match="data.labels_per_class=0 must be >= 1"):
        labels_per_class_subset(full, 0)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_exif_orientation_of_png_and_webp_is_applied(fmt):
    """PNG (eXIf chunk) and WebP (EXIF chunk) files with an EXIF orientation came out as stored; Pillow's
    exif_transpose is the reference."""
    import io

    from PIL import Image, ImageOps

    for orientation in (3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buffer = io.BytesIO()
        Image.fromarray(color_image(3, (20, 30, 3))).save(buffer, format=fmt, exif=exif.tobytes(), lossless=True)
        expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue()))).convert("RGB"))
        out = decode_image(buffer.getvalue())
        assert out.shape == expected.shape and np.array_equal(out, expected), orientation


def test_a_png_above_opencvs_pixel_limit_is_named_so(tmp_path):
    """A valid 34000 x 32000 PNG was "corrupt, truncated or not an image" (OpenCV refuses above 2^30 pixels)."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", 34000, 32000, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    (tmp_path / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk + b"\0" * 64)
    with pytest.raises(ValueError, match=r"big.png: it is 34000x32000 pixels, above OpenCV's limit of 1073741824; "
                                         r"resize it, or raise the limit \(environment variable "):
        read_image(tmp_path / "big.png")
