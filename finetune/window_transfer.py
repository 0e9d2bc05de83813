"""Window transfer (SwinV2 paper, Table 1): classifiers trained at one image / window size, evaluated at larger
image and window sizes without further training; one row per position bias kind, top-1 per image/window.

    python scripts/window_transfer.py                       # trains 3 digits classifiers (cached), evaluates them
    python scripts/window_transfer.py windows=[8,16] checkpoint=[runs/a/checkpoints/last.ckpt,runs/b/last.ckpt]
    python scripts/window_transfer.py finetune.trainer.max_epochs=20 out_dir=runs/window_transfer_20ep

Each checkpoint (a fine-tune .ckpt of scripts/finetune.py; its saved config gives the position bias, window
and image size) is rebuilt at every window W' of `windows` with image size img_size * W' / window_size, so
the image grows with the window and every stage keeps its number of windows (the paper: 256 px / W8 ->
384 px / W12 -> 512 px / W16 -> 768 px / W24); a window where that is not a whole size the model accepts is
an error. It is evaluated with its own parameterization:
  log_cpb, linear_cpb  the bias MLP at the new offsets; coordinates stay normalized by the windows it was
                       trained with (model.pretrained_window_sizes), so the offsets it saw keep their bias and
                       the larger ones extrapolate;
  table                the V1 table bicubic-resized from (2W-1)^2 to (2W'-1)^2 per head, as Swin V1 does
                       (simmim.models.checkpoint.resize_position_bias_table).
The data is the checkpoint's own held-out split (its fine-tune data module) unless data.source is given.

Without checkpoint=, one classifier per recipe in `recipes` is trained first, by scripts/finetune.py with
`recipe=NAME seed=SEED`, the arguments DIGITS_CLASSIFIER (listed at the end; from scratch on the digits, a
2-stage SwinV2 with patch 2 at 32 px / window 8, so img_size = window x patch x 2^(stages-1): 48 px / W12,
64 px / W16, 96 px / W24), then any `finetune.KEY=VALUE` arguments given here. The runs are kept in
<out_dir>/models/<recipe>/ and reused while their settings stay the same.

Writes <out_dir>/window_transfer.csv (position_bias, trained_at, checkpoint, then top-1 per image/window,
columns such as 48/12) and window_transfer.json; an earlier pair there is kept beside them as
window_transfer.<UTC time it was written>.csv and .json (other files of those names are refused). Arguments are
key=value.
"""
import csv
import functools
import json
import math
import warnings
from pathlib import Path


import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Subset

import finetune.train
from finetune.module import SwinV2Classifier
from simmim.cli import (check_result_file, check_values, checkpoint_paths, json_with, keeping_earlier, resolve_device,
                        starting_with)
from simmim.data.datasets import ImageDataset
from simmim.data.sources import FileList, build_sources
from simmim.data.transforms import eval_transform
from simmim.models.checkpoint import (a_layout, detect_layout, load_pretrained, model_config, read_checkpoint,
                                      saved_model_config)
from simmim.models.swinv2 import check_img_size
from simmim.train.config import ConfigError, as_list, available_recipes, leaves, load_config, options_from_argv

SCHEMA = {
    "checkpoint": None,          # a fine-tune .ckpt or [paths]; null: train one digits classifier per recipe
    "windows": [8, 12, 16, 24],
    "recipes": ["ablation_table_bias", "ablation_linear_cpb", "default"],  # fine-tune recipes, one per bias kind
    "seed": 0,
    "out_dir": "runs/window_transfer",
    "device": "auto",            # auto | cpu | cuda | cuda:N
    "batch_size": 64,
    "max_images": None,          # evaluate the first N held-out images; null: all
    "data": {"source": None, "root": None, "list_file": None, "num_workers": 0},  # null source: the checkpoint's
}
# scripts/finetune.py arguments of the out-of-the-box classifiers, after recipe=NAME (finetune.KEY=VALUE adds more).
DIGITS_CLASSIFIER = ["pretrained=null", "data.img_size=32", "model.patch_size=2", "model.depths=[2,2]",
                     "model.num_heads=[2,4]", "model.window_size=8", "data.batch_size=32", "data.num_workers=0",
                     "optim.base_lr=2e-2", "optim.layer_decay=1.0", "train.mixup=0", "train.cutmix=0",
                     "trainer.max_epochs=10", "trainer.enable_progress_bar=false",
                     # the ImageNet crops and flips its README table was measured with (the digits default is milder)
                     "data.crop_scale=[0.08,1.0]", "data.crop_ratio=[0.75,1.3333333333333333]", "data.hflip=0.5"]
LABELS = {"table": "V1 table, bicubic-resized", "linear_cpb": "linear-spaced CPB", "log_cpb": "log-spaced CPB",
          "none": "no position bias"}
FINETUNE_PREFIX = "finetune."
CSV_START = ("position_bias", "trained_at", "checkpoint")  # then top-1 per image/window
# the files written under out_dir, each with how an earlier one is known (only that is kept aside)
RESULT_FILES = {"window_transfer.csv": starting_with(",".join(CSV_START).encode()),
                "window_transfer.json": json_with("columns", "rows")}
USAGE = f"{__doc__}\nDIGITS_CLASSIFIER: {' '.join(DIGITS_CLASSIFIER)}\n"


# ------------------------------------------------------------------------------------------------ training
def train_classifier(recipe: str, args: list[str], models_dir: Path) -> Path:
    """Fine-tune `recipe` with `args` into models_dir/recipe unless that run already holds a finished model
    with the same config; returns its checkpoints/last.ckpt."""
    args = [f"output_dir={models_dir}", f"run_name={recipe}", *args]
    run_dir = models_dir / recipe
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        wanted = dict(leaves(OmegaConf.to_container(load_config("finetune", recipe, args))))
        saved = dict(leaves(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))))
        differ = [key for key in sorted(set(wanted) | set(saved)) if key != "output_dir"  # out_dir spelled otherwise
                  and wanted.get(key) != saved.get(key)]
        if differ:
            raise ConfigError(f"{run_dir} holds a classifier trained with other settings ({differ[0]}: "
                              f"{saved.get(differ[0])}, now {wanted.get(differ[0])}); delete it or pass out_dir=NEW")
        if read_checkpoint(last)["epoch"] + 1 >= (wanted.get("trainer.max_epochs") or 0):
            print(f"{recipe}: reusing {last}")
            return last
    print(f"{recipe}: python scripts/finetune.py recipe={recipe} {' '.join(args)}")
    finetune.train.main([f"recipe={recipe}", *args])
    return last


# ------------------------------------------------------------------------------------------------ evaluation
def image_size_at(model: dict, window: int) -> int:
    """The image size for `window`: img_size * window / window_size of the trained model; ValueError when
    that is not a whole size the model's patch, stages and window accept."""
    img_size, trained_window = model["img_size"], model["window_size"]
    if img_size * window % trained_window:
        step = trained_window // math.gcd(img_size, trained_window)
        raise ValueError(f"window {window} needs a {img_size} * {window} / {trained_window} px image, which is not "
                         f"whole; pick windows that are multiples of {step}")
    size = img_size * window // trained_window
    try:
        check_img_size(size, model["patch_size"], len(model["depths"]), window)
    except ValueError as error:
        raise ValueError(f"window {window} (image {size} px) does not fit this model: {error}") from None
    return size


def classifier_at(ckpt: dict, img_size: int, window: int):
    """(the checkpoint's classifier rebuilt at img_size / window and loaded, the load report)."""
    model = model_config(ckpt, {"img_size": img_size, "window_size": window})
    module = SwinV2Classifier(**{**ckpt["hyper_parameters"], "model": model})
    return module.model, load_pretrained(module.model, ckpt)


@functools.lru_cache(maxsize=4)
def held_out_samples(source: str, root: str | None, list_file: str | None, img_size: int | None) -> tuple[list, int]:
    """The held-out samples of a source, read once (img_size only for the digits, which are upscaled to it), and
    its number of classes (the largest label of both splits + 1)."""
    splits = build_sources(source, img_size, root, list_file)
    labels = [split.labels if isinstance(split, FileList) else [label for _, label in split] for split in splits]
    return splits[1], 1 + max(max(split_labels, default=0) for split_labels in labels)


def held_out_images(ckpt: dict, cfg, img_size: int, num_classes: int) -> ImageDataset | Subset:
    """The held-out split at img_size (eval transform): cfg.data when it names a source, else the data the
    checkpoint was fine-tuned on; the first cfg.max_images images when set. Labels past the classifier's
    num_classes are refused; cfg.data with another number of classes is warned about."""
    data = OmegaConf.to_container(cfg.data) if cfg.data.source else ckpt.get("datamodule_hyper_parameters")
    if not data or not data.get("source"):
        raise ConfigError("the checkpoint does not say which data it was fine-tuned on; pass data.source=digits, "
                          "data.source=folder data.root=DIR or data.source=list data.list_file=FILE")
    source = data["source"]
    samples, classes = held_out_samples(source, data.get("root"), data.get("list_file"),
                                        img_size if source == "digits" else None)
    named = f"data.source={source}" + "".join(f" data.{key}={data[key]}" for key in ("root", "list_file")
                                              if data.get(key))
    if classes > num_classes:
        raise ConfigError(f"{named} has {classes} classes, the classifier {num_classes}: its top-1 cannot be "
                          f"measured there; evaluate on the data it was fine-tuned on (drop data.*)")
    if classes != num_classes and cfg.data.source:
        warnings.warn(f"{named} has {classes} classes, the classifier {num_classes}: top-1 counts a prediction as "
                      f"right where its class index equals the label, which means something only if both number "
                      f"the same classes", stacklevel=2)
    dataset = ImageDataset(samples, eval_transform(img_size))
    return dataset if cfg.max_images is None else Subset(dataset, range(min(cfg.max_images, len(dataset))))


@torch.no_grad()
def top1(model, dataset, cfg, device: torch.device) -> float:
    """Fraction of `dataset` whose arg-max logit is the label."""
    model.eval().to(device)
    correct = 0
    for images, labels in DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.data.num_workers):
        correct += (model(images.to(device)).argmax(dim=1).cpu() == labels).sum().item()
    return correct / len(dataset)


def evaluate(path: str | Path, windows: list[int], cfg, device: torch.device) -> dict:
    """{"position_bias", "trained_at": "IMG/WINDOW", "checkpoint", "top1": {"IMG/WINDOW": accuracy}} of one
    classifier checkpoint at each of `windows`."""
    ckpt = read_checkpoint(path)
    layout = detect_layout(ckpt)
    if layout != "lightning-classifier":
        raise ValueError(f"{path} is {a_layout(layout)}; pass fine-tuned classifiers (scripts/finetune.py "
                         f"writes them to <run>/checkpoints/last.ckpt)")
    trained = saved_model_config(ckpt)
    sizes = [(image_size_at(trained, window), window) for window in windows]
    row = {"position_bias": trained["position_bias"], "trained_at": f"{trained['img_size']}/{trained['window_size']}",
           "checkpoint": str(path), "top1": {}}
    for img_size, window in sizes:
        model, report = classifier_at(ckpt, img_size, window)
        accuracy = top1(model, held_out_images(ckpt, cfg, img_size, trained["num_classes"]), cfg, device)
        row["top1"][f"{img_size}/{window}"] = accuracy
        resized = f" ({len(report.resized)} bias tables resized)" if report.resized else ""
        print(f"{LABELS[row['position_bias']]} at {img_size} px / window {window}: top-1 {accuracy:.4f}{resized}")
    return row


# ------------------------------------------------------------------------------------------------ output
def write_table(rows: list[dict], out_dir: Path) -> tuple[Path, Path, list[str]]:
    """window_transfer.csv and .json under out_dir (earlier ones kept aside: `keeping_earlier`); returns their
    paths and the image/window columns."""
    columns = list(dict.fromkeys(column for row in rows for column in row["top1"]))
    csv_path, json_path = (out_dir / name for name in RESULT_FILES)
    with keeping_earlier(csv_path, json_path) as (csv_tmp, json_tmp):
        with open(csv_tmp, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow([*CSV_START, *columns])
            for row in rows:
                writer.writerow([row["position_bias"], row["trained_at"], row["checkpoint"],
                                 *(f"{row['top1'][c]:.4f}" if c in row["top1"] else "" for c in columns)])
        json_tmp.write_text(json.dumps({"columns": columns, "rows": rows}, indent=2) + "\n")
    return csv_path, json_path, columns


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """The top-1 table: one row per checkpoint (its position bias kind), one column per image px / window."""
    def size(column: str) -> str:
        return column.replace("/", " px / W")

    lines = ["| position bias | trained at | " + " | ".join(map(size, columns)) + " |",
             "|---" * (len(columns) + 2) + "|"]
    for row in rows:
        cells = (f"{row['top1'][c]:.3f}" if c in row["top1"] else "" for c in columns)
        lines.append(f"| {LABELS[row['position_bias']]} | {size(row['trained_at'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    finetune_args = [a.removeprefix(FINETUNE_PREFIX) for a in argv if a.startswith(FINETUNE_PREFIX)]
    cfg = options_from_argv(SCHEMA, [a for a in argv if not a.startswith(FINETUNE_PREFIX)], USAGE)
    if cfg is None:
        return
    device = resolve_device(cfg.device)
    windows = [cfg.windows] if isinstance(cfg.windows, int) else list(cfg.windows)
    if not windows or not all(isinstance(w, int) and w > 0 for w in windows):
        raise ConfigError(f"windows={cfg.windows} must be positive window sizes, e.g. windows=[8,12,16,24]")
    check_values(cfg, (("batch_size", cfg.batch_size >= 1, "an integer >= 1"),
                       ("max_images", cfg.max_images is None or type(cfg.max_images) is int and cfg.max_images >= 1,
                        "an integer >= 1, or null (every held-out image)"),
                       ("data.num_workers", cfg.data.num_workers >= 0, "an integer >= 0")))
    for name, is_result in RESULT_FILES.items():  # before the classifiers' training
        check_result_file(Path(cfg.out_dir) / name, is_result, "window transfer measurement", "out_dir", cfg.out_dir)
    out_dir = Path(cfg.out_dir)
    if cfg.checkpoint:
        if finetune_args:
            raise ConfigError("finetune.* arguments train the out-of-the-box classifiers; drop them with checkpoint=")
        paths = checkpoint_paths(cfg.checkpoint)
    else:
        recipes = as_list(cfg.recipes)  # recipes=default: one recipe, not seven letters
        unknown = [name for name in recipes if name not in available_recipes("finetune")]
        if not recipes or unknown:  # before any training, not when its turn comes
            raise ConfigError(f"recipes={cfg.recipes}: expected fine-tune recipes, of "
                              f"{', '.join(available_recipes('finetune'))}")
        args = [f"seed={cfg.seed}", *DIGITS_CLASSIFIER, *finetune_args]
        paths = [train_classifier(recipe, args, out_dir / "models") for recipe in recipes]
    rows = [evaluate(path, windows, cfg, device) for path in paths]
    csv_path, json_path, columns = write_table(rows, out_dir)
    print(f"\nheld-out top-1 at each image / window size, without further training:\n"
          f"{markdown_table(rows, columns)}\n\ncsv: {csv_path}\njson: {json_path}")

