"""scripts/window_transfer.py end to end on a tiny setting; the V1 bias-table resize that it and fine-tuning use;
every position bias kind loading into a larger window."""
import csv
import json
import re
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Subset, TensorDataset

from conftest import TINY, assert_kept_beside, jpeg, randomize_, tiny_swinv2
from simmim.models.checkpoint import load_pretrained, resize_position_bias_table
from finetune.module import SwinV2Classifier
from simmim.data.datasets import ImageDataset
from simmim.data.sources import build_source
from simmim.data.transforms import eval_transform
from simmim.train.config import ConfigError
from simmim.train.trainer import make_trainer

import finetune.window_transfer as window_transfer

# The out-of-the-box geometry at half size (16 px / window 4, widths 16-32), two steps of training each.
TINY_TRAINING = ["finetune.data.img_size=16", "finetune.model.window_size=4", "finetune.model.embed_dim=16",
                 "finetune.model.num_heads=[1,2]", "finetune.data.batch_size=8", "finetune.trainer.max_epochs=1",
                 "finetune.trainer.limit_train_batches=2", "finetune.trainer.limit_val_batches=1",
                 "finetune.trainer.log_every_n_steps=1", "finetune.trainer.enable_model_summary=false"]
MODEL_CFG = {k: (list(v) if isinstance(v, tuple) else v) for k, v in TINY.items()}  # 64 px / window 4


@torch.no_grad()
def independent_top1(ckpt_path: Path, img_size: int, count: int) -> float:
    """Top-1 of a fine-tune checkpoint at its own size on the first `count` held-out digits, via Lightning."""
    module = SwinV2Classifier.load_from_checkpoint(ckpt_path, map_location="cpu").eval()
    val = Subset(ImageDataset(build_source("digits", "val", img_size), eval_transform(img_size)), range(count))
    images, labels = zip(*[val[i] for i in range(count)])
    return (module(torch.stack(images)).argmax(1) == torch.tensor(labels)).float().mean().item()


@pytest.mark.slow
def test_trains_one_classifier_per_bias_kind_and_writes_the_table(tmp_path, capsys):
    window_transfer.main([f"out_dir={tmp_path}", "windows=[4,6,8]", "max_images=24", "device=cpu", *TINY_TRAINING])
    printed = capsys.readouterr().out
    with open(tmp_path / "window_transfer.csv") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["position_bias", "trained_at", "checkpoint", "16/4", "24/6", "32/8"]
    assert [row["position_bias"] for row in rows] == ["table", "linear_cpb", "log_cpb"]
    table = json.loads((tmp_path / "window_transfer.json").read_text())
    assert table["columns"] == ["16/4", "24/6", "32/8"]
    for row, saved in zip(rows, table["rows"]):
        assert row["trained_at"] == "16/4" and Path(row["checkpoint"]).is_file()
        for column in table["columns"]:
            assert 0.0 <= saved["top1"][column] <= 1.0
            assert float(row[column]) == pytest.approx(saved["top1"][column], abs=1e-4)
    assert "| V1 table, bicubic-resized | 16 px / W4 |" in printed and "(4 bias tables resized)" in printed

    # at its own size, the table's number is the checkpoint's accuracy computed independently
    for saved in table["rows"]:
        assert saved["top1"]["16/4"] == pytest.approx(independent_top1(Path(saved["checkpoint"]), 16, 24))

    # a second run reuses the trained classifiers; checkpoint= evaluates given files
    stamp = Path(rows[0]["checkpoint"]).stat().st_mtime_ns
    window_transfer.main([f"out_dir={tmp_path}", "windows=[4]", "max_images=8", "device=cpu", *TINY_TRAINING])
    assert capsys.readouterr().out.count("reusing") == 3 and Path(rows[0]["checkpoint"]).stat().st_mtime_ns == stamp
    window_transfer.main([f"out_dir={tmp_path}/given", f"checkpoint={rows[2]['checkpoint']}", "windows=8",
                          "max_images=8", "device=cpu"])
    with open(tmp_path / "given" / "window_transfer.csv") as file:
        assert [(r["position_bias"], r["32/8"] != "") for r in csv.DictReader(file)] == [("log_cpb", True)]


def test_a_rerun_keeps_the_earlier_table(tmp_path, capsys):
    """The table of a run is kept under a dated name by the next run's (the trained classifiers are reused)."""
    def rows(top1: float) -> list[dict]:
        return [{"position_bias": "log_cpb", "trained_at": "16/4", "checkpoint": "last.ckpt", "top1": {"16/4": top1}}]

    csv_path, json_path, _ = window_transfer.write_table(rows(0.5), tmp_path)
    earlier = {path: path.read_bytes() for path in (csv_path, json_path)}
    written = max(path.stat().st_mtime for path in earlier)  # one stamp for the pair
    assert window_transfer.write_table(rows(0.75), tmp_path) == (csv_path, json_path, ["16/4"])
    for path, data in earlier.items():
        assert_kept_beside(path, data, written)
    assert capsys.readouterr().err.count("kept the earlier window_transfer.") == 2


class PeaksFirst(pl.LightningModule):
    """val/top1 is best after the first epoch, so a best-only checkpointing would keep that epoch."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/top1", 1.0 / (1 + self.current_epoch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_last_checkpoint_is_the_final_epoch_not_the_best(tmp_path):
    """The classifiers evaluated are checkpoints/last.ckpt: it must hold the weights training ended with."""
    cfg = OmegaConf.create({"seed": 0, "checkpoint": {"every_n_steps": 0, "every_minutes": 0, "keep_last": 1},
                            "trainer": {"max_epochs": 3, "enable_progress_bar": False, "enable_model_summary": False}})
    batches = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)
    make_trainer(cfg, tmp_path, monitor="val/top1", mode="max").fit(PeaksFirst(), batches, batches)
    steps = {name: torch.load(tmp_path / "checkpoints" / f"{name}.ckpt", weights_only=False)["global_step"]
             for name in ("last", "best")}
    assert steps == {"last": 6, "best": 2}


def test_image_size_grows_with_the_window_or_a_clear_error():
    paper = {"img_size": 256, "window_size": 8, "patch_size": 4, "depths": [2, 2, 6, 2]}
    assert [window_transfer.image_size_at(paper, w) for w in (8, 12, 16, 24)] == [256, 384, 512, 768]
    demo = {"img_size": 128, "window_size": 8, "patch_size": 4, "depths": [2, 2, 2, 2]}  # finetune default
    assert window_transfer.image_size_at(demo, 12) == 192
    with pytest.raises(ValueError, match=r"window 5 \(image 80 px\) does not fit this model: img_size 80 does not"):
        window_transfer.image_size_at(demo, 5)
    with pytest.raises(ValueError, match="not whole; pick windows that are multiples of 2"):
        window_transfer.image_size_at({**paper, "img_size": 20}, 5)


def test_bad_options_are_one_line_before_any_training(tmp_path):
    (tmp_path / "taken").write_text("a file")
    for arg, message in ((f"out_dir={tmp_path / 'taken'}", f"out_dir={tmp_path / 'taken'}: {tmp_path / 'taken'} is a "
                                                           f"file; pass a folder (new or existing)"),  # a traceback
                         ("max_images=0", "max_images=0: expected an integer >= 1, or null (every held-out image)"),
                         ("batch_size=0", "batch_size=0: expected an integer >= 1"),
                         ("seed=abc", "seed=abc: expected an integer, as the default 0"),
                         ("recipes=[default,nope]", "recipes=['default', 'nope']: expected fine-tune recipes, of "
                                                    "ablation_dot_attention"),  # was: after training default
                         ("recipes=[]", "recipes=[]: expected fine-tune recipes")):  # was: an empty table
        with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
            window_transfer.main([f"out_dir={tmp_path / 'new'}", arg])  # the later out_dir= wins
    assert not (tmp_path / "new").exists()


def test_data_numbering_other_classes_than_the_classifier(tmp_path):
    """A 10-class classifier on a 3-class folder was scored without a word (labels 0..2 against predictions
    0..9); labels past its head are refused, another class count given with data.* is warned about."""
    for cls in ("ant", "bee", "cat"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(4):
            (tmp_path / "data" / cls / f"{i}.jpg").write_bytes(jpeg(i))
    cfg = OmegaConf.create({"data": {"source": "folder", "root": str(tmp_path / "data"), "list_file": None},
                            "max_images": None})
    with pytest.raises(ConfigError, match=r"^data.source=folder data.root=.*data has 3 classes, the classifier 2: "
                                          r"its top-1 cannot be measured there; evaluate on the data it was"):
        window_transfer.held_out_images({}, cfg, 16, num_classes=2)
    with pytest.warns(UserWarning, match=r"data.root=.*data has 3 classes, the classifier 10: top-1 counts a "
                                         r"prediction as right where its class index equals the label"):
        window_transfer.held_out_images({}, cfg, 16, num_classes=10)
    own = {"datamodule_hyper_parameters": {"source": "digits"}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(window_transfer.held_out_images({}, cfg, 16, num_classes=3)) >= 1
        assert len(window_transfer.held_out_images(own, OmegaConf.merge(cfg, {"data": {"source": None, "root": None}}),
                                                   16, num_classes=12)) == 360  # its own data: a larger head is fine


def test_only_classifier_checkpoints_are_evaluated(tmp_path):
    encoder_only = {"model": {"encoder.patch_embed.proj.weight": torch.zeros(16, 3, 4, 4)}, "config": {}}
    with pytest.raises(ValueError, match="is an exported-simmim checkpoint; pass fine-tuned classifiers"):
        window_transfer.evaluate(encoder_only, [8], None, torch.device("cpu"))


# ------------------------------------------------------------------------------------------------ table resize
def test_resize_to_the_same_window_is_the_identity():
    table = torch.randn(7 * 7, 3)
    assert torch.allclose(resize_position_bias_table(table, 4), table, atol=1e-6)


@pytest.mark.parametrize("window", [2, 6, 12])
def test_a_constant_table_stays_constant_and_the_center_keeps_its_value(window):
    constant = resize_position_bias_table(torch.full((49, 2), 0.7), window)
    assert constant.shape == ((2 * window - 1) ** 2, 2) and torch.allclose(constant, torch.full_like(constant, 0.7))
    table = torch.randn(49, 3)
    resized = resize_position_bias_table(table, window).view(2 * window - 1, 2 * window - 1, 3)
    assert torch.allclose(resized[window - 1, window - 1], table.view(7, 7, 3)[3, 3], atol=1e-6)


def test_resize_is_bicubic_per_head():
    """Each head is resized on its own: a table whose heads are a picture and its negative stays so; the
    resized values leave the source range (cubic overshoot), which linear or nearest resizing cannot."""
    picture = torch.zeros(7, 7)
    picture[3, 3] = 1.0
    table = torch.stack([picture.flatten(), -picture.flatten()], dim=1)
    resized = resize_position_bias_table(table, 8)
    assert torch.allclose(resized[:, 0], -resized[:, 1]) and resized.shape == (15 * 15, 2)
    assert resized[:, 0].min() < -1e-3


def test_resize_rejects_a_table_that_is_not_a_square_window():
    with pytest.raises(ValueError, match=r"has \(2W-1\)\^2 rows, got 50"):
        resize_position_bias_table(torch.zeros(50, 2), 4)


def test_load_pretrained_resizes_tables_with_a_report_line():
    source = randomize_(tiny_swinv2(position_bias="table"), seed=5)
    larger = tiny_swinv2(position_bias="table", img_size=128, window_size=8)
    report = load_pretrained(larger, {"model": source.state_dict()})
    tables = [k for k in larger.state_dict() if k.endswith("relative_position_bias_table")]
    assert report.resized == tables and len(tables) == 8 and not report.missing
    assert set(tables) <= set(report.loaded) and f"resized          8  {tables[0]}" in str(report)
    windows = [block.attn.window_size for layer in larger.layers for block in layer.blocks]
    for key, window in zip(tables, windows):
        expected = resize_position_bias_table(source.state_dict()[key], window)
        assert torch.equal(larger.state_dict()[key], expected)


# ------------------------------------------------------------------------------------------------ larger windows
def cpb_grid(attn) -> torch.Tensor:
    """16 * sigmoid(cpb_mlp(coords)) over the offset grid, one offset at a time: (2W-1, 2W-1, heads)."""
    table = attn.relative_coords_table[0]
    rows = torch.stack([attn.cpb_mlp(coords) for coords in table.reshape(-1, 2)])
    return 16 * torch.sigmoid(rows).view(*table.shape[:2], -1)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["log_cpb", "linear_cpb", "table"])
def test_each_bias_kind_loads_into_a_larger_window(kind):
    """A 64 px / window 4 classifier checkpoint rebuilt at 128 px / window 8: everything loads; at the offsets
    both windows have, the CPB gives the trained bias (its coordinates keep the trained normalization), and
    a resized table keeps its zero-offset value."""
    model = {**MODEL_CFG, "position_bias": kind}
    source = randomize_(tiny_swinv2(position_bias=kind), seed=6)
    ckpt = {"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()},
            "hyper_parameters": {"model": model}}
    larger, report = window_transfer.classifier_at(ckpt, 128, 8)
    assert not report.missing and not report.unexpected and not report.reinitialized
    assert torch.isfinite(larger.eval()(torch.randn(2, 3, 128, 128))).all()
    for layer_s, layer_l in zip(source.layers, larger.layers):
        for block_s, block_l in zip(layer_s.blocks, layer_l.blocks):
            ws, wl = block_s.attn.window_size, block_l.attn.window_size
            assert wl == 2 * ws
            if kind == "table":
                center_s = block_s.attn.relative_position_bias_table[(2 * ws - 1) ** 2 // 2]  # offset (0, 0)
                center_l = block_l.attn.relative_position_bias_table[(2 * wl - 1) ** 2 // 2]
                assert torch.allclose(center_l, center_s, atol=1e-6)
            else:
                shared = slice(wl - ws, wl + ws - 1)
                assert torch.allclose(cpb_grid(block_l.attn)[shared, shared], cpb_grid(block_s.attn), atol=1e-5)
    assert (report.resized != []) == (kind == "table")
