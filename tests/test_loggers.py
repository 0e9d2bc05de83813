"""Loggers and extra callbacks from the recipe (simmim/train/loggers.py), pictures to every image logger, the W&B
and MLflow runs that every start of a run directory continues."""
import importlib
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor
from pytorch_lightning.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

import simmim.pretrain as pretrain
import simmim.train.loggers as loggers
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


def test_a_logger_entry_is_bound_to_its_signature_once(tmp_path, monkeypatch):
    """A class_path logger's init_args were bound to its class's signature when the config was checked and again when
    the loggers were built, where its constructor takes them (which checks them)."""
    bound, signature = [], inspect.signature

    def counting(obj, *args, **kwargs):
        bound.extend([obj] if obj is CSVLogger else [])
        return signature(obj, *args, **kwargs)

    monkeypatch.setattr(inspect, "signature", counting)
    entry = f"{{class_path: pytorch_lightning.loggers.CSVLogger, init_args: {{save_dir: {tmp_path}, name: mine}}}}"
    (logger,) = build_loggers(cfg_with(f"logging.loggers=[{entry}]"), tmp_path)  # checked, then built
    assert isinstance(logger, CSVLogger) and bound == [CSVLogger]
    with pytest.raises(ConfigError, match=r"^logging.loggers: CSVLogger\(\*\*\{'sav': 'x'\}\) failed: missing a "
                                          r"required argument: 'save_dir'$"):  # still found when it is checked
        cfg_with("logging.loggers=[{class_path: CSVLogger, init_args: {sav: x}}]")


def test_callbacks_from_the_recipe_command_line():
    cfg = cfg_with("callbacks=[{class_path: EarlyStopping, init_args: {monitor: val/loss, patience: 3}},"
                   "{class_path: pytorch_lightning.callbacks.LearningRateMonitor}]")
    early, lr, check = build_callbacks(cfg)
    assert isinstance(early, EarlyStopping) and early.monitor == "val/loss" and early.patience == 3
    assert isinstance(lr, LearningRateMonitor) and check.monitors == [("EarlyStopping", "val/loss")]
    assert build_callbacks(cfg_with()) == []


@pytest.mark.parametrize("override, message", [
    ("trainer.logger=false", "trainer.logger clashes with the run's loggers; set logging.loggers="),
    ("trainer.callbacks=[]", "trainer.callbacks clashes with the run's callbacks; add yours as callbacks="),
    ("logging.loggers=[tensorbord]", "logging.loggers names 'tensorbord'; use tensorboard, csv, wandb, mlflow"),
    ("logging.loggers=wandb", r"logging.loggers=wandb is not a list; write logging.loggers=\[wandb\]"),
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


@pytest.mark.timeout(300)
def test_a_monitor_the_run_does_not_log_is_one_line_before_training(tmp_path):
    """EarlyStopping on val/lss failed at the end of the first epoch, in a traceback that left no checkpoint: the
    sanity check's validation logs every val/ metric, and one the run does not log is named there."""
    result = run_script("simmim.pretrain", *fast_args(tmp_path, "trainer.num_sanity_val_steps=1",
                                                      "callbacks=[{class_path: EarlyStopping, init_args: "
                                                      "{monitor: val/lss}}]"))
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == (
        "error: callbacks: EarlyStopping monitors val/lss, which this run does not log (did you mean val/loss?); its "
        "validation metrics are val/loss: set init_args.monitor to one of them")
    assert not (tmp_path / "demo" / "checkpoints").exists() or not list((tmp_path / "demo" / "checkpoints").iterdir())


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


@pytest.fixture
def offline(monkeypatch):
    """W&B offline; MLflow in the run directory (no MLFLOW_TRACKING_URI), the variable MLflow sets put back after."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # so that the delenv below is undone when the test ends
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setattr(loggers, "TRACKING_URI", None)


@pytest.mark.slow
def test_pretraining_logs_pictures_to_wandb_and_mlflow(tmp_path, offline):
    """A short run with all four loggers (wandb offline, mlflow file store under the run directory; both are test
    extras) and an extra callback: the reconstruction pictures reach W&B and MLflow as well as TensorBoard."""
    pretrain.main(fast_args(tmp_path, "logging.loggers=[tensorboard,csv,wandb,mlflow]",
                            "callbacks=[{class_path: LearningRateMonitor, init_args: {logging_interval: step}}]"))
    run = tmp_path / "demo"
    wandb_images = list((run / "wandb").rglob("media/images/reconstruction_*.png"))
    mlflow_images = list((run / "mlruns").rglob("reconstruction/step_*.png"))
    assert len(wandb_images) >= 2 and len(mlflow_images) >= 2
    assert any((run / "tensorboard").glob("events.out.tfevents.*"))
    metrics = (run / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "lr-AdamW" in metrics  # the extra LearningRateMonitor logged


def mlflow_runs(run: Path) -> dict:
    """{run id: (status, steps of train/loss)} of the MLflow store of a run directory."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    return {r.info.run_id: (r.info.status, [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")])
            for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}


def mlflow_params(run: Path, run_id: str) -> dict:
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{run / 'mlflow.db'}").get_run(run_id).data.params


@pytest.mark.slow
def test_every_start_of_a_run_continues_its_wandb_and_mlflow_runs(tmp_path, offline):
    """Run A for one epoch, run B, then A again for a second epoch, all in this process (as from a notebook): A's
    MLflow run holds the steps of both its starts, as its metrics.csv does, both W&B starts of A write the run its
    logger_runs.json names, and B has runs of its own; both have the resolved recipe (W&B the latest start's,
    MLflow the first value of each key). (Before: a new W&B and MLflow run per start; B logged into
    A's W&B run, which Lightning leaves open; A's second start failed on MLflow's ./mlruns: MLflow had set
    MLFLOW_TRACKING_URI to the first store.)"""
    for name, epochs, workers in (("a", 1, 0), ("b", 1, 0), ("a", 2, 1)):  # a parameter changed: MLflow keeps 0
        pretrain.main(fast_args(tmp_path, "logging.loggers=[csv,wandb,mlflow]", f"run_name={name}",
                                f"trainer.max_epochs={epochs}", f"data.num_workers={workers}"))
    import wandb
    assert dict(wandb.run.config["recipe"]["trainer"]) == {**dict(load_config("pretrain").trainer),  # A's second
                                                           "max_epochs": 2, "limit_train_batches": 3,
                                                           "limit_val_batches": 1, "log_every_n_steps": 1,
                                                           "enable_progress_bar": False}
    for name, starts, steps in (("a", 2, [0, 1, 2, 3, 4, 5]), ("b", 1, [0, 1, 2])):
        run = tmp_path / name
        runs = json.loads((run / "logger_runs.json").read_text())
        header, *rows = [line.split(",") for line in (run / "csv" / "metrics.csv").read_text().splitlines()]
        loss, step = header.index("train/loss"), header.index("step")
        assert [int(row[step]) for row in rows if row[loss]] == steps
        assert mlflow_runs(run) == {runs["mlflow"]: ("FINISHED", steps)}
        params = mlflow_params(run, runs["mlflow"])
        assert params["recipe/run_name"] == name and params["recipe/trainer/max_epochs"] == "1"  # A: its first
        wandb_starts = list((run / "wandb").glob("offline-run-*"))
        assert len(wandb_starts) == starts and all(p.name.endswith(f"-{runs['wandb']}") for p in wandb_starts)


def test_wandb_and_mlflow_runs_are_recorded_continued_and_replaced(tmp_path, offline, monkeypatch):
    """build_loggers on rank 0: a new W&B id and a new MLflow run recorded in logger_runs.json, the same runs at
    the next build (the MLflow one running again; a changed parameter keeps its first value with a warning, where
    Lightning's logger would stop the run), a W&B id of the user's own kept; an MLflow run that the tracking
    store does not have and an unreadable record are replaced with a warning; ranks > 0 record nothing."""
    record = tmp_path / "logger_runs.json"
    mine = "{class_path: pytorch_lightning.loggers.WandbLogger, init_args: {id: mine, offline: true}}"
    cfg = cfg_with("logging.loggers=[wandb,mlflow]")

    wandb, mlflow = build_loggers(cfg, tmp_path)
    runs = json.loads(record.read_text())
    assert isinstance(wandb, WandbLogger) and isinstance(mlflow, MLFlowLogger)
    assert wandb.version == runs["wandb"] and mlflow.run_id == runs["mlflow"]
    mlflow.log_hyperparams({"lr": 0.1, "model": {"depths": [2, 2]}})
    mlflow.finalize("success")
    wandb, mlflow = build_loggers(cfg, tmp_path)
    assert (wandb.version, mlflow.run_id) == (runs["wandb"], runs["mlflow"])
    assert mlflow_runs(tmp_path) == {runs["mlflow"]: ("RUNNING", [])}
    with pytest.warns(UserWarning, match=r"keeps the first value of a parameter: lr 0.1 \(now 0.2\); each start's"):
        mlflow.log_hyperparams({"lr": 0.2, "model": {"depths": [2, 2]}, "workers": 4})  # MLflow refuses a change
    assert mlflow.experiment.get_run(mlflow.run_id).data.params == {"lr": "0.1", "model/depths": "[2, 2]",
                                                                    "workers": "4"}
    (own,) = build_loggers(cfg_with(f"logging.loggers=[{mine}]"), tmp_path)
    assert own.version == "mine" and json.loads(record.read_text()) == runs

    # MLFLOW_TRACKING_URI set since (a server): a run of its own there, and the run directory's again after
    # (before: one record, so each change of store started a new run in it)
    other = f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setattr(loggers, "TRACKING_URI", other)
    _, elsewhere = build_loggers(cfg, tmp_path)
    assert elsewhere.run_id != runs["mlflow"]
    assert json.loads(record.read_text()) == {**runs, f"mlflow {other}": elsewhere.run_id}
    monkeypatch.setattr(loggers, "TRACKING_URI", None)
    assert build_loggers(cfg, tmp_path)[1].run_id == runs["mlflow"]
    monkeypatch.setattr(loggers, "TRACKING_URI", other)
    assert build_loggers(cfg, tmp_path)[1].run_id == elsewhere.run_id
    record.write_text(json.dumps({**runs, f"mlflow {other}": "0badc0ffee"}))  # a run the store does not have
    with pytest.warns(UserWarning, match="MLflow run 0badc0ffee of logger_runs.json cannot be continued in "
                                         f"the tracking store {other} .*: logging to a new run"):
        _, mlflow = build_loggers(cfg, tmp_path)
    assert mlflow.run_id not in (elsewhere.run_id, runs["mlflow"])
    assert json.loads(record.read_text()) == {**runs, f"mlflow {other}": mlflow.run_id}

    for broken in ("{", '{"wandb": 5, "mlflow": 7}', '{"wandb": "a/b c"}'):  # edited by hand
        record.write_text(broken)
        with pytest.warns(UserWarning, match=f"{record} cannot be read .*: W&B and MLflow log to new runs, recorded "
                                             r"there anew \(the file is kept as logger_runs.unreadable-.*\.json\)"):
            wandb, _ = build_loggers(cfg, tmp_path)
        assert wandb.version != runs["wandb"] and json.loads(record.read_text())["wandb"] == wandb.version
    assert sorted(p.read_text() for p in tmp_path.glob("logger_runs.unreadable-*.json")) == sorted(
        ("{", '{"wandb": 5, "mlflow": 7}', '{"wandb": "a/b c"}'))  # each kept as the user left it

    record.unlink()
    record.mkdir()
    with pytest.raises(ValueError, match=f"{record} is a folder: .* move the folder away"):
        build_loggers(cfg, tmp_path)
    record.rmdir()

    monkeypatch.setenv("LOCAL_RANK", "1")
    assert len(build_loggers(cfg, tmp_path)) == 2 and not record.exists()


def test_an_mlflow_server_that_does_not_answer_is_one_line(tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI of a server that is down: one line naming it and the fixes (was MLflow's traceback of
    80 lines, after its retries: 4 minutes by default; none here)."""
    monkeypatch.setattr(loggers, "TRACKING_URI", "http://127.0.0.1:1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = load_config("pretrain", overrides=["logging.loggers=[mlflow]"])
    with pytest.raises(ValueError, match=r"^MLflow cannot start a run in the tracking store http://127.0.0.1:1 \(API "
                                         r"request to .* failed.*\); check MLFLOW_TRACKING_URI or the mlflow logger's "
                                         r"tracking_uri, or leave mlflow out of logging.loggers$"):
        build_loggers(cfg, tmp_path)


@pytest.mark.timeout(300)
@pytest.mark.skipif(not hasattr(importlib.import_module("mlflow.environment_variables"), "MLFLOW_ALLOW_FILE_STORE"),
                    reason="this MLflow takes a folder as its tracking store")
@pytest.mark.parametrize("folder", ["{tmp}/mlruns", "file://{tmp}/mlruns"])
def test_an_mlflow_folder_store_is_one_line_before_the_run_directory(tmp_path, monkeypatch, folder):
    """MLflow refuses a folder as its tracking store (the versions with MLFLOW_ALLOW_FILE_STORE); the run refused it
    only when its logger was made, after the run directory was: now the config check names the key, the value and
    the fix, and nothing is written."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = folder.format(tmp=tmp_path)
    monkeypatch.setattr(loggers, "TRACKING_URI", uri)
    result = run_script("simmim.pretrain", f"output_dir={tmp_path / 'runs'}", "logging.loggers=[mlflow]")
    assert result.returncode == 1 and result.stderr == (
        f"error: MLFLOW_TRACKING_URI={uri} is a folder path, which MLflow refuses as a tracking store; set "
        f"MLFLOW_TRACKING_URI to a database, e.g. sqlite:///mlflow.db (or MLFLOW_ALLOW_FILE_STORE=true to keep the "
        f"folder)\n"), result.stderr
    monkeypatch.setattr(loggers, "TRACKING_URI", None)  # Lightning's MLFlowLogger by default: file:./mlruns
    with pytest.raises(ConfigError, match=r"^logging.loggers MLFlowLogger init_args.tracking_uri=file:./mlruns is a "
                                          r"folder path, which MLflow refuses"):
        cfg_with("logging.loggers=[{class_path: MLFlowLogger, init_args: {tracking_uri: null}}]")
    assert not (tmp_path / "runs").exists()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's own opt-out: the folder is taken
    loggers.check_mlflow_store(uri, "MLFLOW_TRACKING_URI")


class KwargsMLFlowLogger(MLFlowLogger):
    """A user's subclass that passes its arguments on: its signature shows no tracking_uri or save_dir."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)


def test_mlflow_stores_that_are_no_folder_are_taken(monkeypatch):
    """MLflow's stores by name (no scheme, no folder) and a subclass's database passed through **kwargs were
    refused as folders."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    for uri in ("databricks", "databricks-uc", "uc", "databricks://profile", "sqlite:///mlflow.db"):
        loggers.check_mlflow_store(uri, "MLFLOW_TRACKING_URI")
    subclass = "{class_path: test_loggers.KwargsMLFlowLogger, init_args: {%s}}"
    cfg_with(f"logging.loggers=[{subclass % 'tracking_uri: sqlite:///mlflow.db'}]")
    with pytest.raises(ConfigError, match=r"init_args.tracking_uri=file:./mlruns is a folder path"):  # its default
        cfg_with(f"logging.loggers=[{subclass % ''}]")
