"""Loggers and extra callbacks from the recipe (simmim/train/loggers.py), pictures to every image logger."""
from pathlib import Path

import numpy as np
import pytest
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

import simmim.pretrain as pretrain
from simmim.train.config import ConfigError, load_config
from simmim.train.run_dir import AppendingCSVLogger
from simmim.train.loggers import build_callbacks, build_loggers, log_image
from conftest import run_script
from test_pretrain_cli import fast_args


def cfg_with(*overrides):
    return load_config("pretrain", "default", list(overrides))


def test_default_loggers_and_names(tmp_path):
    loggers = build_loggers(cfg_with(), tmp_path)
    assert [type(lg) for lg in loggers] == [TensorBoardLogger, AppendingCSVLogger]  # a resumed run appends
    assert Path(loggers[0].log_dir) == tmp_path / "tensorboard" and Path(loggers[1].log_dir) == tmp_path / "csv"
    assert [type(lg) for lg in build_loggers(cfg_with("logging.loggers=[csv]"), tmp_path)] == [AppendingCSVLogger]
    assert build_loggers(cfg_with("logging.loggers=[]"), tmp_path) == []


def test_logger_by_class_path(tmp_path):
    entry = f"{{class_path: pytorch_lightning.loggers.CSVLogger, init_args: {{save_dir: {tmp_path}, name: mine}}}}"
    (logger,) = build_loggers(cfg_with(f"logging.loggers=[{entry}]"), tmp_path)
    assert isinstance(logger, CSVLogger) and logger.name == "mine"


def test_callbacks_from_the_recipe_command_line():
    cfg = cfg_with("callbacks=[{class_path: EarlyStopping, init_args: {monitor: val/loss, patience: 3}},"
                   "{class_path: pytorch_lightning.callbacks.LearningRateMonitor}]")
    early, lr = build_callbacks(cfg)
    assert isinstance(early, EarlyStopping) and early.monitor == "val/loss" and early.patience == 3
    assert isinstance(lr, LearningRateMonitor)
    assert build_callbacks(cfg_with()) == []


@pytest.mark.parametrize("override, message", [
    ("trainer.logger=false", "trainer.logger clashes with the run's loggers; set logging.loggers="),
    ("trainer.callbacks=[]", "trainer.callbacks clashes with the run's callbacks; add yours as callbacks="),
    ("logging.loggers=[tensorbord]", "logging.loggers names 'tensorbord'; use tensorboard, csv, wandb, mlflow"),
    ("callbacks=[EarlyStopping]", "callbacks entry 'EarlyStopping' is not {class_path: ..., init_args: {...}}"),
    ("callbacks=[{class_path: NoSuchCallback}]", "callbacks: cannot import NoSuchCallback"),
    ("callbacks=[{class_path: pytorch_lightning.loggers.CSVLogger}]", "is not a pytorch_lightning"),
    ("callbacks=[{class_path: EarlyStopping, init_args: {monitr: x}}]", r"EarlyStopping\(\*\*\{'monitr': 'x'\}\) failed"),
    ("callbacks=[{class_path: EarlyStopping, init_args: {monitor: x, mode: maxx}}]", "`mode` can be min, max, got maxx"),
])
def test_bad_entries_are_one_clear_error_when_the_config_is_read(override, message):
    with pytest.raises(ConfigError, match=message):
        cfg_with(override)


def test_a_bad_callback_writes_nothing(tmp_path):
    result = run_script("simmim.pretrain", f"output_dir={tmp_path}",
                        "callbacks=[{class_path: EarlyStopping, init_args: {monitor: x, mode: maxx}}]")
    assert result.returncode == 1 and result.stderr.startswith("error: callbacks: EarlyStopping(")
    assert list(tmp_path.iterdir()) == []  # no run directory, no config: the run never started


def test_missing_extra_names_the_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    monkeypatch.setattr("importlib.import_module", lambda name: no_wandb(name))
    with pytest.raises(ConfigError, match=r"needs the wandb package: pip install 'swinv2-simmim\[wandb\]'"):
        build_loggers(cfg_with("logging.loggers=[wandb]"), tmp_path)


def test_log_image_skips_loggers_without_images(tmp_path):
    image = np.zeros((8, 8, 3), np.uint8)
    assert not log_image(CSVLogger(tmp_path), "x", image, 0)
    assert log_image(TensorBoardLogger(tmp_path), "x", image, 0)


@pytest.mark.slow
def test_pretraining_logs_pictures_to_wandb_and_mlflow(tmp_path, monkeypatch):
    """A short run with all four loggers (wandb offline, mlflow file store under the run directory; both are test
    extras) and an extra callback: the reconstruction pictures reach W&B and MLflow as well as TensorBoard."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    pretrain.main(fast_args(tmp_path, "logging.loggers=[tensorboard,csv,wandb,mlflow]",
                            "callbacks=[{class_path: LearningRateMonitor, init_args: {logging_interval: step}}]"))
    run = tmp_path / "demo"
    wandb_images = list((run / "wandb").rglob("media/images/reconstruction_*.png"))
    mlflow_images = list((run / "mlruns").rglob("reconstruction/step_*.png"))
    assert len(wandb_images) >= 2 and len(mlflow_images) >= 2
    assert any((run / "tensorboard").glob("events.out.tfevents.*"))
    metrics = (run / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "lr-AdamW" in metrics  # the extra LearningRateMonitor logged
