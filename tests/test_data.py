import warnings

import cv2
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from simmim.data import (IMAGENET_MEAN, IMAGENET_STD, EpochSampler, ImageDataset, MaskedImageDataset,
                         SimMIMDataModule, build_source, build_sources, digits_split, eval_transform,
                         finetune_transform, labeled_datasets, labels_per_class_subset, pretrain_transform,
                         read_image)

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
@pytest.mark.parametrize("make", [pretrain_transform, finetune_transform, eval_transform])
def test_transforms_give_normalized_float_tensors(make):
    out = make(32)(image=color_image(shape=(50, 70, 3)))["image"]
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    pixels = out * STD + MEAN
    assert pixels.min() >= -1e-4 and pixels.max() <= 1 + 1e-4
    assert pixels.std() > 0.1  # not a constant image


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
    for dataset in (train, val):
        image, label = dataset[5]
        assert image.shape == (3, 24, 24) and isinstance(label, int) and 0 <= label <= 9


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


def test_folder_source_skips_corrupt_files_with_one_warning(tmp_path):
    make_class_folder(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train, val = build_sources("folder", 32, root=tmp_path)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"skipped 2 unreadable images of 7 under {tmp_path} (first: ")
    assert "noise.webp" in messages[0]

    labels = {path.split("/")[-1]: label for path, label in train + val}
    assert labels == {"rgba.png": 0, "photo.JPG": 0, "color.png": 1, "gray.png": 1, "deep16.PNG": 1}
    assert len(val) == 1
    with pytest.warns(UserWarning, match="skipped 2"):
        assert build_sources("folder", 32, root=tmp_path) == (train, val)  # fixed hold-out

    dataset = ImageDataset(train + val, pretrain_transform(32))
    assert all(dataset[i][0].shape == (3, 32, 32) for i in range(len(dataset)))


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


def test_folder_images_at_top_level_get_label_zero(tmp_path):
    for i in range(3):
        write_png(tmp_path / f"{i}.png", color_image(i))
    write_png(tmp_path / "sub" / "x.png", color_image())
    train, val = build_sources("folder", 32, root=tmp_path)
    assert len(train) == 3 and len(val) == 1 and {label for _, label in train + val} == {0}


def test_list_source(tmp_path):
    write_png(tmp_path / "imgs" / "a.png", color_image(1))
    write_png(tmp_path / "imgs" / "my b.png", color_image(2))
    absolute = write_png(tmp_path / "elsewhere" / "c.png", color_image(3))
    write_truncated_jpg(tmp_path / "imgs" / "cut.jpg")
    list_file = tmp_path / "lists" / "train.txt"
    list_file.parent.mkdir()
    list_file.write_text(f"# path label\n../imgs/a.png 3\n\n../imgs/my b.png\t7\n  {absolute}\n../imgs/cut.jpg 1\n")
    with pytest.warns(UserWarning, match="skipped 1 unreadable images of 4"):
        train, val = build_sources("list", 32, list_file=list_file)
    labels = {path.split("/")[-1]: label for path, label in train + val}
    assert labels == {"a.png": 3, "my b.png": 7, "c.png": 0} and len(val) == 1
    assert all(ImageDataset(train, eval_transform(32))[i][0].shape == (3, 32, 32) for i in range(len(train)))


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
    with pytest.raises(ValueError, match="no readable images under .*bad"), pytest.warns(UserWarning):
        build_sources("folder", 32, root=tmp_path / "bad")
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
    assert image.shape == (3, 32, 32) and mask.shape == (8, 8) and mask.dtype == torch.int64
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
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
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
        return self.weight * batch[0].mean()

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


# ------------------------------------------------------------------------------------------------ augmentation keys
def test_crop_and_flip_keys_reach_the_transforms():
    image = color_image(shape=(32, 32, 3))
    for make in (pretrain_transform, finetune_transform):
        plain = eval_transform(32)  # at 32 px the eval transform resizes to 37 and center-crops: not the input
        kept = make(32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0)
        flipped = make(32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=1.0)
        expected = (torch.from_numpy(image).permute(2, 0, 1) / 255 - MEAN) / STD
        for _ in range(3):
            assert torch.allclose(kept(image=image)["image"], expected, atol=1e-5)
            assert torch.allclose(flipped(image=image)["image"], expected.flip(2), atol=1e-5)
        assert not torch.allclose(plain(image=image)["image"], expected, atol=1e-2)
        # a small crop range gives crops of about that area: the same 8x8 checkerboard cell covers more pixels
        board = np.kron((np.indices((8, 8)).sum(0) % 2) * 255, np.ones((16, 16))).astype(np.uint8)
        board = np.repeat(board[..., None], 3, axis=2)
        small = make(128, crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0), hflip=0.0)(image=board)["image"]
        row = (small[0, 64] > 0).numpy()
        assert np.count_nonzero(row[1:] != row[:-1]) <= 5  # 4 cells of 32 px in a row (whole image: 8 of 16)


def test_datamodule_and_labeled_datasets_use_the_augmentation_keys():
    dm = SimMIMDataModule(batch_size=4, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=1.0, **SMALL)
    dm.setup()
    (image, label), (source, _) = dm.train_set.dataset[0], dm.train_set.dataset.samples[0]
    source = np.repeat(source[..., None], 3, axis=2)
    assert torch.allclose(image, ((torch.from_numpy(source).permute(2, 0, 1) / 255 - MEAN) / STD).flip(2), atol=1e-5)
    train, _ = labeled_datasets("digits", img_size=32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=1.0)
    assert torch.allclose(train[0][0], image, atol=1e-5)


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
    train, val = labeled_datasets("digits", img_size=16, labels_per_class=3, seed=2)
    assert len(train) == 30 and len(val) == 360
    with pytest.raises(ValueError, match="data.labels_per_class=0 must be >= 1"):
        labels_per_class_subset(full, 0)
