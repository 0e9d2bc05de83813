"""k-NN and linear probe (simmim.evaluation), the k-NN monitor callback and scripts/evaluate.py."""
import json
import math
import warnings

import cv2
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import TensorDataset

from conftest import randomize_, run_script
from simmim.data.datasets import ImageDataset
from simmim.data.sources import build_sources
from simmim.data.transforms import eval_transform
from simmim.evaluation import KNNMonitor, knn_monitor, knn_scores, knn_top1, linear_probe_top1, plot_knn_history
from simmim.pretrain import SimMIMPretrainModule
from simmim.train.config import load_config

import simmim.tools.evaluate as evaluate

MODEL = dict(img_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
             drop_path_rate=0.0)


def brute_force_knn(train, train_labels, query, num_classes, k, temperature):
    """The DINO vote written out per query with numpy: cosine similarities, the k largest, exp(s / T) per label."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    scores = np.zeros((len(query), num_classes))
    for i, q in enumerate(query):
        similarity = train @ (q / np.linalg.norm(q))
        for j in np.argsort(-similarity)[:k]:
            scores[i, train_labels[j]] += math.exp(similarity[j] / temperature)
    return scores


def test_knn_scores_match_the_vote_written_out():
    gen = torch.Generator().manual_seed(0)
    train, query = torch.randn(50, 8, generator=gen), torch.randn(7, 8, generator=gen)
    labels = torch.randint(0, 4, (50,), generator=gen)
    for k, temperature in ((5, 0.07), (20, 0.5), (80, 1.0)):  # k > N uses every training image
        ours = knn_scores(train, labels, query, 4, k, temperature, chunk=3)
        expected = brute_force_knn(train.numpy(), labels.numpy(), query.numpy(), 4, min(k, 50), temperature)
        np.testing.assert_allclose(ours.numpy() / ours.numpy().sum(1, keepdims=True),  # the rows are scaled
                                   expected / expected.sum(1, keepdims=True), rtol=1e-5)


def test_a_small_temperature_approaches_the_nearest_neighbour():
    """exp(similarity / 0.01) overflowed float32: every neighbour tied at inf and the lowest class won."""
    gen = torch.Generator().manual_seed(1)
    train, query = torch.randn(200, 16, generator=gen), torch.randn(40, 16, generator=gen)
    labels = torch.randint(0, 5, (200,), generator=gen)
    nearest = knn_scores(train, labels, query, 5, k=1, temperature=1.0).argmax(1)
    for temperature in (0.01, 1e-4, 1e-9):
        assert torch.equal(knn_scores(train, labels, query, 5, k=20, temperature=temperature).argmax(1), nearest)


def test_temperature_weights_close_neighbours_over_many_far_ones():
    # one close neighbour of class 0, two farther ones of class 1: a low temperature lets the close one win
    train = torch.tensor([[1.0, 0.05], [1.0, 0.6], [1.0, -0.6]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    assert knn_scores(train, labels, query, 2, k=3, temperature=0.01).argmax() == 0
    assert knn_scores(train, labels, query, 2, k=3, temperature=10.0).argmax() == 1
    assert knn_top1(train, labels, query, torch.tensor([0]), k=3, temperature=0.01) == 1.0
    with pytest.raises(ValueError, match="k >= 1 and temperature > 0"):
        knn_scores(train, labels, query, 2, k=0)


def test_linear_probe_separates_separable_classes_and_not_random_labels():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=gen) * 4
    labels = torch.arange(300) % 3
    features = centers[labels] + torch.randn(300, 16, generator=gen)
    assert linear_probe_top1(features[:200], labels[:200], features[200:], labels[200:]) == 1.0
    shuffled = labels[torch.randperm(300, generator=gen)]
    assert linear_probe_top1(features[:200], shuffled[:200], features[200:], shuffled[200:]) < 0.6


class Stub(pl.LightningModule):
    """A pretraining-shaped module (`simmim.encoder`) whose encoder reads the features straight from the input."""

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward_features(self, x):
            return x[:, None, None, :] * self.scale  # (B, 1, 1, C)

        def forward_head(self, x, pre_logits=False):
            assert pre_logits
            return x.mean(dim=(1, 2))

    def __init__(self):
        super().__init__()
        self.simmim = torch.nn.Module()
        self.simmim.encoder = self.Encoder()
        self.modes = []

    def training_step(self, batch, batch_idx):
        self.modes.append(self.simmim.encoder.training)
        return (self.simmim.encoder.scale - 2) ** 2 + 0 * batch[0].sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_monitor_measures_on_schedule_keeps_a_history_and_plots(tmp_path):
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(2, 6, generator=gen) * 3
    labels = torch.arange(40) % 2
    features = centers[labels] + torch.randn(40, 6, generator=gen)
    monitor = KNNMonitor(TensorDataset(features[:30], labels[:30]), TensorDataset(features[30:], labels[30:]),
                         every_n_epochs=2, k=5, plot_path=tmp_path / "knn.png")
    module = Stub()
    trainer = pl.Trainer(max_epochs=3, logger=pl.loggers.CSVLogger(tmp_path, name="csv", version=""),
                         callbacks=[monitor], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, torch.utils.data.DataLoader(TensorDataset(features), batch_size=10))
    expected = knn_top1(features[:30], labels[:30], features[30:], labels[30:], k=5)
    assert expected == 1.0
    # before training, after epoch 2 (every 2) and after the last (3); the loss rows are the epochs' means
    assert [row["epoch"] for row in monitor.history] == [0, 1, 2, 3]
    assert [row["knn_top1"] for row in monitor.history] == [expected, None, expected, expected]
    losses = [row["train_loss"] for row in monitor.history]
    assert losses[0] is None and losses[3] < losses[1]
    assert all(module.modes)  # the measurement puts the encoder back in train mode
    csv = (tmp_path / "csv" / "metrics.csv").read_text()
    assert csv.splitlines()[0].split(",").count("knn/top1") == 1 and csv.count("1.0") >= 3
    assert (tmp_path / "knn.png").stat().st_size > 1000
    restored = KNNMonitor(monitor.train_set, monitor.val_set)
    restored.load_state_dict(monitor.state_dict())
    assert restored.history == monitor.history
    with pytest.raises(ValueError, match="knn_every_n_epochs=0 must be >= 1"):
        KNNMonitor(monitor.train_set, monitor.val_set, every_n_epochs=0)


def test_monitor_on_unlabeled_images_warns_once_and_measures_no_more(tmp_path):
    features = torch.randn(20, 6, generator=torch.Generator().manual_seed(0))
    unlabeled = TensorDataset(features, torch.zeros(20, dtype=torch.int64))  # e.g. shards without .cls
    monitor = KNNMonitor(unlabeled, unlabeled, every_n_epochs=1, plot_path=tmp_path / "knn.png")
    trainer = pl.Trainer(max_epochs=2, logger=False, callbacks=[monitor], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    with pytest.warns(UserWarning, match="k-NN monitor off: the training images have a single label") as caught:
        trainer.fit(Stub(), torch.utils.data.DataLoader(TensorDataset(features), batch_size=10))
    assert sum("k-NN monitor off" in str(w.message) for w in caught) == 1  # not again at epochs 1 and 2
    assert monitor.off and [row["knn_top1"] for row in monitor.history] == [None, None, None]
    assert (tmp_path / "knn.png").is_file()  # the losses are still plotted


def test_monitor_of_a_listed_source_without_labels_is_off_from_the_start():
    cfg = load_config("pretrain")  # the monitor on (eval.knn_every_n_epochs=4)
    unlabeled = ImageDataset([(np.zeros((8, 8), np.uint8), 0)] * 5, eval_transform(32))
    with pytest.warns(UserWarning, match="k-NN monitor off: the training images have a single label"):
        assert knn_monitor(cfg, unlabeled, unlabeled, "knn.png") == []  # no monitor: nothing is embedded
    labeled = ImageDataset([(np.zeros((8, 8), np.uint8), i % 2) for i in range(20)], eval_transform(32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [type(m) for m in knn_monitor(cfg, labeled, labeled, "knn.png")] == [KNNMonitor]


def test_monitor_of_a_few_held_out_images_warns():
    """A folder of 60 images holds out 1 (2 %): its k-NN top-1 is 0 or 1 (was: no word of it)."""
    cfg = load_config("pretrain")
    train = ImageDataset([(np.zeros((8, 8), np.uint8), i % 2) for i in range(59)], eval_transform(32))
    val = ImageDataset([(np.zeros((8, 8), np.uint8), 1)], eval_transform(32))
    with pytest.warns(UserWarning, match=r"the k-NN monitor measures 1 held-out image\(s\): its top-1 moves in steps "
                                         r"of 1/1, .*or set eval.knn_every_n_epochs=0"):
        assert [type(m) for m in knn_monitor(cfg, train, val, "knn.png")] == [KNNMonitor]


def test_plot_accepts_rows_without_measurements(tmp_path):
    history = [{"epoch": 0, "train_loss": None, "val_loss": None, "knn_top1": 0.5},
               {"epoch": 1, "train_loss": 1.0, "val_loss": 0.9, "knn_top1": None}]
    assert plot_knn_history(history, tmp_path / "sub" / "plot.png").stat().st_size > 1000


@pytest.mark.timeout(60)
def test_the_knn_plot_leaves_matplotlibs_backend_as_it_was(tmp_path):
    """Pretraining in a notebook drew knn.png through pyplot after switching matplotlib to Agg: the notebook's
    own figures stopped showing. The backend chosen before is the backend after."""
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        plot_knn_history([{"epoch": 0, "train_loss": 1.0, "val_loss": 0.9, "knn_top1": 0.5}], tmp_path / "plot.png")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)


# ------------------------------------------------------------------------------------------------ the script
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("evaluate") / "encoder.pth"
    module = randomize_(SimMIMPretrainModule(model=MODEL), seed=3)
    module.export_encoder(path, {"model": MODEL})
    return module, path


def test_evaluate_digits_table_matches_an_independent_knn(exported, capsys):
    module, path = exported
    evaluate.main([f"checkpoint={path}", "data.source=digits", "num_workers=0", "device=cpu", "batch_size=256"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| checkpoint | layout | k-NN top-1 (k=20)") and len(rows) == 3
    assert "1437 train / 360 val images, 10 classes, 32-d pooled features" in out
    knn, probe = (float(v) for v in rows[1].split("|")[3:5])
    assert "exported-simmim" in rows[1] and "random weights" in rows[2]

    # the same k-NN computed here: eval transform, the randomized encoder's pooled map, the vote written out
    encoder = module.simmim.encoder.eval()
    train, val = build_sources("digits", 32)
    with torch.no_grad():
        embed = lambda samples: torch.cat([encoder.forward_features(torch.stack(
            [eval_transform(32)(image=np.repeat(image[..., None], 3, axis=2))["image"] for image, _ in chunk]))
            .mean(dim=(1, 2)) for chunk in (samples[i:i + 256] for i in range(0, len(samples), 256))])
        train_features, val_features = embed(train), embed(val)
    scores = brute_force_knn(train_features.numpy(), [label for _, label in train], val_features.numpy(), 10, 20, 0.07)
    expected = (scores.argmax(axis=1) == np.array([label for _, label in val])).mean()
    assert knn == pytest.approx(expected, abs=6e-4)  # the table rounds to 3 decimals
    assert 0.5 < probe <= 1.0  # chance is 0.1


def table(out: str) -> tuple[str, list[float]]:
    """The evaluate table's size line and its first row's k-NN and probe top-1."""
    row = next(line for line in out.splitlines() if line.startswith("| ") and "checkpoint |" not in line
               and "---" not in line)
    return next(line for line in out.splitlines() if "train /" in line), [float(v) for v in row.split("|")[3:5]]


def test_evaluate_on_shards_equals_the_folder_they_were_made_from(tmp_path, exported, capsys):
    from simmim.tools import make_shards

    _, path = exported
    for split, samples in zip(("train", "val"), build_sources("digits", 32)):
        for i, (image, label) in enumerate(samples[:150 if split == "train" else 50]):
            (tmp_path / "digits" / split / str(label)).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(tmp_path / "digits" / split / str(label) / f"{i}.png"), image)
    make_shards.main([f"root={tmp_path / 'digits'}", f"out={tmp_path / 'shards'}", "shard_mb=0.01"])
    capsys.readouterr()
    common = [f"checkpoint={path}", "num_workers=2", "device=cpu", "random_baseline=false"]
    evaluate.main([*common, "data.source=folder", f"data.root={tmp_path / 'digits'}"])
    folder = table(capsys.readouterr().out)
    shards = [*common, "data.source=shards", f"data.shards={tmp_path / 'shards' / 'train'}",
              f"data.val_shards={tmp_path / 'shards' / 'val'}"]
    evaluate.main(shards)
    streamed = table(capsys.readouterr().out)
    assert folder[0].startswith("folder: 150 train / 50 val images, 10 classes") and streamed[0].startswith(
        "shards: 150 train / 50 val images, 10 classes")
    # the same images and labels: the same k-NN; the probe within one val image (its solver sees another order)
    assert streamed[1][0] == folder[1][0] and streamed[1][1] == pytest.approx(folder[1][1], abs=0.021)

    # max_images: a fixed subset of the folder; the first shards holding as many (whole shards)
    evaluate.main([*common, "data.source=folder", f"data.root={tmp_path / 'digits'}", "max_images=40"])
    assert table(capsys.readouterr().out)[0].startswith("folder: 40 train / 40 val images")
    index = json.loads((tmp_path / "shards" / "train" / "shardindex.json").read_text())["shardlist"]
    counts = np.cumsum([entry["nsamples"] for entry in index])
    assert len(counts) > 3 and counts[0] < 40
    evaluate.main([*shards, "max_images=40"])
    size_line = table(capsys.readouterr().out)[0]
    assert size_line.startswith(f"shards: {counts[np.searchsorted(counts, 40)]} train / ")


def test_evaluate_errors_are_one_line(tmp_path, exported):
    _, path = exported
    import cv2
    for i in range(4):  # images at the folder's top level: all label 0
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((8, 8, 3), 40 * i, np.uint8))
    cases = {("data.source=digits",): "error: checkpoint= is required",
             (f"checkpoint={path}", "data.source=folder", f"data.root={tmp_path}", "num_workers=0",
              "random_baseline=false"): "error: the folder source gives every training image the same label",
             (f"checkpoint={path}", "kk=3"): "error: unknown key 'kk'",
             (f"checkpoint={path}", "max_images=0"): "error: max_images=0 must be a positive integer or null",
             (f"checkpoint={path}", "data.source=shards"): "error: data.source=shards needs data.shards=",
             # wrong types and ranges: one line naming the key (these were tracebacks or another library's words)
             (f"checkpoint={path}", "k=abc"): "error: k=abc: expected an integer, as the default 20\n",
             (f"checkpoint={path}", "probe_c=0"): "error: probe_c=0: expected > 0",
             (f"checkpoint={path}", "batch_size=0"): "error: batch_size=0: expected an integer >= 1\n",
             (f"checkpoint={path}", "model.img_size=abc"): "error: model.img_size=abc: expected an integer or null\n",
             (f"checkpoint={path}", "model.window_size=-4"): "error: model.window_size=-4: expected an integer > 0\n",
             (f"checkpoint={path}", "data.source=folder"): "error: the folder source needs data.root=<folder of "
                                                            "images> (data.source=digits: the embedded digits)",
             (f"checkpoint={path}", "k="): "error: k=null: expected an integer, as the default 20\n",  # a TypeError
             ("checkpoint=123",): "error: checkpoint 123 does not exist",  # a TypeError: YAML's number
             (f"checkpoint=[{path},nope.pth]",): "error: checkpoint nope.pth does not exist",  # after the first
             # the weights load into a pre-norm model without an error and compute something else: was a table row
             (f"checkpoint={path}", "model.norm_mode=pre_norm"): "error: model.norm_mode=pre_norm: the checkpoint was "
                                                                 "trained with norm_mode=res_post_norm"}
    for argv, message in cases.items():
        result = run_script("simmim.tools.evaluate", *argv)
        assert result.returncode == 1 and result.stderr.startswith(message), result.stderr
        assert f"{path}:" not in result.stdout  # refused before any checkpoint was evaluated
