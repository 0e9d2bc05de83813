"""scripts/signal_propagation.py: block-output amplitudes, res-post-norm against pre-norm (SwinV2 paper, Figure 2)."""
import csv
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

import simmim.tools.signal_propagation as signal_propagation
from conftest import assert_kept_beside, run_script
from simmim.pretrain import SimMIMPretrainModule
from simmim.train.config import ConfigError
from simmim.plots import COLORS

# deep and narrow: 2 + 12 blocks at width 16-32, 32 px digits
DEEP = ["model.embed_dim=16", "model.depths=[2,12]", "model.num_heads=[2,4]", "model.img_size=32",
        "model.window_size=4", "batch_size=4", "mask_patch_size=8", "device=cpu"]


def read_rows(out_dir: Path) -> list[dict]:
    with open(out_dir / "signal_propagation.csv", newline="") as file:
        return list(csv.DictReader(file))


def curve(rows: list[dict], label: str) -> np.ndarray:
    return np.array([float(r["rms"]) for r in rows if r["curve"] == label])


def test_at_init_the_comparison_is_trivial(tmp_path):
    """The official init zeroes the res-post-norms: every block is the identity, so within a stage all
    amplitudes are equal. Pre-norm blocks do change the main branch, but hardly: neither curve grows."""
    signal_propagation.main([*DEEP, "steps=0", f"out_dir={tmp_path}"])
    rows = read_rows(tmp_path)
    post, pre = curve(rows, "res_post_norm"), curve(rows, "pre_norm")
    assert len(post) == len(pre) == 14
    stage = np.array([int(r["stage"]) for r in rows if r["curve"] == "pre_norm"])
    for s in (0, 1):
        assert np.ptp(post[stage == s]) < 1e-5 * post[stage == s].mean()
    assert np.ptp(pre[stage == 1]) > 1e-4
    assert 0.9 < post[-1] / post[0] < 1.1 and 0.9 < pre[-1] / pre[0] < 1.1


def test_pre_norm_amplitude_grows_faster_with_depth_after_training(tmp_path, capsys):
    signal_propagation.main([*DEEP, "steps=20", "lr=5e-3", f"out_dir={tmp_path}"])
    rows = read_rows(tmp_path)
    assert list(rows[0]) == ["curve", "norm_mode", "block_index", "stage", "block", "rms"]
    pre_rows = [r for r in rows if r["curve"] == "pre_norm"]
    assert [int(r["block_index"]) for r in pre_rows] == list(range(14))
    assert [(int(r["stage"]), int(r["block"])) for r in pre_rows] == [(0, 0), (0, 1)] + [(1, b) for b in range(12)]
    assert {r["norm_mode"] for r in pre_rows} == {"pre_norm"}

    post, pre = curve(rows, "res_post_norm"), curve(rows, "pre_norm")
    growth_post, growth_pre = post[-1] / post[0], pre[-1] / pre[0]
    assert growth_pre > 2.0 and growth_pre > 2 * growth_post, (growth_pre, growth_post)
    assert np.all(np.diff(pre[2:]) > 0)  # pre-norm: every block of the deep stage adds to the amplitude
    assert "pre_norm: RMS first block" in capsys.readouterr().out

    plot = cv2.imread(str(tmp_path / "signal_propagation.png"))
    assert plot.shape == (540, 960, 3)
    for color in COLORS[:2]:  # both curves drawn, beyond their legend entries
        hits = np.all(np.abs(plot.astype(int) - bgr(color)) <= 8, axis=-1)
        assert hits.sum() > 400, color


def test_checkpoints_are_measured_as_loaded(tmp_path):
    model = dict(img_size=32, patch_size=4, embed_dim=16, depths=[2, 4], num_heads=[2, 4], window_size=4,
                 drop_path_rate=0.0)
    paths = []
    for norm_mode in ("res_post_norm", "pre_norm"):
        module = SimMIMPretrainModule(model={**model, "norm_mode": norm_mode})
        paths.append(module.export_encoder(tmp_path / f"{norm_mode}.pth", {"model": {**model, "norm_mode": norm_mode}}))
    signal_propagation.main([f"checkpoint=[{paths[0]},{paths[1]}]", "data.source=random", "batch_size=4",
                             "device=cpu", f"out_dir={tmp_path}"])
    rows = read_rows(tmp_path)
    labels = list(dict.fromkeys(r["curve"] for r in rows))
    assert labels == [f"{paths[0]} (res_post_norm)", f"{paths[1]} (pre_norm)"]
    assert len(curve(rows, labels[0])) == len(curve(rows, labels[1])) == 6

    with pytest.raises(ConfigError, match="apply to fresh models"):
        signal_propagation.main([f"checkpoint={paths[0]}", "steps=5", f"out_dir={tmp_path}"])
    with pytest.raises(ValueError, match="norm_mode='post' is not one of"):
        signal_propagation.main([*DEEP, "norm_modes=[post]", "steps=0", f"out_dir={tmp_path}"])


def test_a_rerun_keeps_the_earlier_table_and_plot(tmp_path, capsys):
    def curves(rms: float) -> list:
        return [("pre_norm", "pre_norm", [(0, 0, 1.0), (0, 1, rms), (1, 0, 2 * rms)])]

    paths = signal_propagation.write_outputs(curves(1.5), tmp_path, "first")
    earlier = {path: path.read_bytes() for path in paths}
    written = max(path.stat().st_mtime for path in paths)  # one stamp for the pair
    assert signal_propagation.write_outputs(curves(3.0), tmp_path, "second") == paths
    for path, data in earlier.items():
        assert_kept_beside(path, data, written)
    assert capsys.readouterr().err.count("kept the earlier signal_propagation.") == 2
    assert cv2.imread(str(paths[1])).shape == (540, 960, 3)


def test_help_and_one_line_errors(tmp_path):
    result = run_script("simmim.tools.signal_propagation", "--help")
    assert result.returncode == 0 and "Figure 2" in result.stdout and "model.depths" in result.stdout
    result = run_script("simmim.tools.signal_propagation", "norm_mode=pre_norm")
    assert result.returncode == 1 and result.stderr.startswith(
        "error: unknown key 'norm_mode' in the command line; did you mean norm_modes")
    (tmp_path / "taken").write_text("a file")
    for arg, message in (("steps=-1", "steps=-1: expected an integer >= 0, or null"),  # ran as steps=0
                         ("steps=abc", "steps=abc: expected an integer >= 0, or null"),  # a traceback
                         ("batch_size=0", "batch_size=0: expected an integer >= 1"),  # a traceback
                         ("lr=-1", "lr=-1: expected a number > 0"),  # torch's "Invalid learning rate"
                         ("norm_modes=[]", "norm_modes=[]: expected one or more of res_post_norm, pre_norm"),
                         ("lr=", "lr=null: expected a number, as the default 0.005"),  # TypeErrors
                         (f"out_dir={tmp_path / 'taken'}", f"out_dir={tmp_path / 'taken'}: {tmp_path / 'taken'} is a "
                                                           f"file; pass a folder (new or existing)")):  # a traceback
        result = run_script("simmim.tools.signal_propagation", arg)
        assert result.returncode == 1 and result.stderr == f"error: {message}\n", result.stderr
    result = run_script("simmim.tools.signal_propagation", *DEEP, "steps=1", "lr=1e6", f"out_dir={tmp_path / 'big'}")
    assert result.returncode == 1 and result.stderr.startswith("error: the output of stage 0 block "), result.stderr
    assert re.search(r"is not finite \(RMS (nan|inf)\): the activations overflow; after training here, lower lr\n$",
                     result.stderr)
    assert not (tmp_path / "big").exists()  # was: a table and plot of inf and nan


def test_a_mask_patch_size_the_model_cannot_take_is_one_line_before_any_model(tmp_path, monkeypatch):
    """mask_patch_size= is checked against the fresh models' img_size and patch_size before any is built (it was
    the mask generator's ValueError in its own names, "input_size 32 is not divisible by mask_patch_size 12", once
    the first model was built and its data read); unused without training steps."""
    monkeypatch.setattr(signal_propagation, "build_simmim", lambda model: pytest.fail("a model was built"))
    result = run_script("simmim.tools.signal_propagation", *DEEP, "mask_patch_size=12", f"out_dir={tmp_path}")
    assert result.returncode == 1 and result.stderr == (
        "error: mask_patch_size=12: expected a divisor of the model's img_size 32 that is a multiple of its "
        "patch_size 4, one of 4, 8, 16, 32\n"), result.stderr
    monkeypatch.undo()
    result = run_script("simmim.tools.signal_propagation", *DEEP, "mask_patch_size=12", "steps=0",
                        "norm_modes=[pre_norm]", f"out_dir={tmp_path}")
    assert result.returncode == 0, result.stderr


def bgr(color: str) -> tuple[int, int, int]:
    """'#rrggbb' -> (b, g, r), as cv2.imread gives pixels."""
    return tuple(int(color[i:i + 2], 16) for i in (5, 3, 1))


def test_line_plot_puts_larger_values_higher():
    from simmim.plots import figure_to_rgb, line_plot

    image = figure_to_rgb(line_plot({"up": ([0, 1, 2], [1.0, 10.0, 100.0])}, log_y=True))
    assert image.shape == (540, 960, 3)
    rows, cols = np.nonzero(np.all(np.abs(image.astype(int) - bgr(COLORS[0])[::-1]) <= 8, axis=-1))
    left, right = cols < 300, cols > 700  # the median ignores the legend's short sample line
    assert np.median(rows[left]) > np.median(rows[right]) + 200
    with pytest.raises(ValueError, match="positive"):
        line_plot({"zero": ([0, 1], [0.0, 1.0])}, log_y=True)
