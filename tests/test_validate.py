"""Bad values end in one line naming the key, the value and what is expected, before anything runs."""
import re
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import finetune.train as finetune_script
import simmim.pretrain as pretrain
from simmim.cli import run_cli
from simmim.data.sources import build_sources
from simmim.models.arguments import model_section
from simmim.train.config import ConfigError, load_config, options_from_argv
from simmim.train.validate import validate_labels


@pytest.mark.parametrize("override, message", [
    ("trainer.max_steps=abc", "trainer.max_steps=abc: expected an integer >= -1"),
    ("trainer.max_epochs=2.5", "trainer.max_epochs=2.5: expected a value of type Optional[int]"),
    ("trainer.max_steps=null", "trainer.max_steps=null: expected a value of type int"),  # was <class 'int'>
    ("model.window_size=0", "model.window_size=0: expected an integer > 0"),
    ("model.depths=[2, 2", "model.depths=[2, 2: not valid YAML (did not find expected ',' or ']')"),
    ("model.depths=[2,a]", "model.depths=[2, a]: expected a list of integers"),
    ("model.depths=[2,2]", "model.depths=[2, 2] and model.num_heads=[2, 4, 8, 16]: expected one value per stage"),
    ("data.img_size=abc", "data.img_size=abc: expected an integer, as the default 64"),
    ("data.img_size=66", "model.img_size=66: expected a multiple of model.patch_size=4"),
    ("data.batch_size=-1", "data.batch_size=-1: expected an integer > 0"),
    ("data.num_workers=null", "data.num_workers=null: expected an integer, as the default 2"),
    ("simmim.mask_ratio=1.5", "simmim.mask_ratio=1.5: expected a number in (0, 1)"),
    ("simmim.mask_ratio=0", "simmim.mask_ratio=0: expected a number in (0, 1), the share of mask patches hidden"),
    ("simmim.mask_kind=blocks", "simmim.mask_kind=blocks: expected random or block"),
    ("simmim.norm_target_patch_size=46", "simmim.norm_target_patch_size=46: expected null or an odd window of "
                                         "pixels >= 3, e.g. 47"),  # a ValueError at the first step, after the lock
    ("simmim.norm_target_patch_size=1", "simmim.norm_target_patch_size=1: expected null or an odd window"),  # NaN
    ("optim.schedule=step", "optim.schedule=step: expected cosine or multistep"),
    ("data.crop_scale=[0.5]", "data.crop_scale=[0.5] must be [min, max] area fractions"),  # was at data setup
    ("model.compile=always", "model.compile=always: expected true, false or auto (true where training runs on CUDA)"),
    ("optim.betas=[0.9,2]", "optim.betas=[0.9, 2]: expected two numbers in [0, 1)"),
    ("optim.base_lr=fast", "optim.base_lr=fast: expected a number, as the default 0.008"),
    ("model.qkv_bias=1", "model.qkv_bias=1: expected true or false"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last=0: expected an integer > 0"),
    ("eval.knn_max_images=0", "eval.knn_max_images=0: expected null (every image) or an integer > 0"),
    ("eval.knn_max_images=many", "eval.knn_max_images=many: expected an integer or null"),
    ("eval.knn_temperature=0", "eval.knn_temperature=0: expected a number > 0"),
    ("eval.knn_every_n_epochs=-1", "eval.knn_every_n_epochs=-1: expected an integer >= 0 (0: off)"),
    ("data.shards=5", "data.shards=5: expected a string or null"),
    ("data.shuffle_buffer=0", "data.shuffle_buffer=0: expected an integer > 0"),
    ("trainer.accelerator=gpu", "trainer.accelerator=gpu but no CUDA GPU is visible here"),
    ("trainer.devices=0", "trainer.devices=0: expected an integer > 0, -1 (every device), a list of device indices"),
    ("trainer.devices=-2", "trainer.devices=-2: expected an integer > 0, -1 (every device)"),  # were Lightning's
    ("trainer.devices=abc", "trainer.devices=abc: expected an integer > 0, -1 (every device)"),  # TypeError, run dir
    ("trainer.val_check_interval=0", "trainer.val_check_interval=0: expected a fraction of the epoch's batches in "
                                     "(0, 1] or a number of batches >= 1"),  # a ZeroDivisionError after a step
    ("trainer.limit_train_batches=-1", "trainer.limit_train_batches=-1: expected a fraction of the epoch's batches "
                                       "in [0, 1] or a number of batches >= 0"),  # Lightning's, after the logs
    ("trainer.limit_val_batches=1.5", "trainer.limit_val_batches=1.5: expected a fraction"),
    ("trainer.max_time=abc", "trainer.max_time=abc: expected days:hours:minutes:seconds (02:12:00:00)"),  # tracebacks
    ("optim.betas=[0.9]", "optim.betas=[0.9]: expected two numbers in [0, 1), e.g. [0.9, 0.999]"),  # an IndexError
    ("run_name=null", "run_name=null: expected a name for the run's folder"),  # was a run folder named None
    ("run_name=/tmp/elsewhere", "run_name=/tmp/elsewhere: expected a name for the run's folder under output_dir, "
                                "not a path out of it; give the folder above as output_dir="),  # was the run there
    ("run_name=../up", "run_name=../up: expected a name for the run's folder under output_dir, not a path out"),
    ("data.shards=/data/shards", "data.shards=/data/shards is read by data.source=shards only, and data.source="
                                 "digits; add data.source=shards, or drop it (data.shards=null)"),  # trained on the
    ("data.root=/data/images", "data.root=/data/images is read by data.source=folder only"),  # digits without a word
])
def test_bad_values_are_one_line(override, message):
    if override == "trainer.accelerator=gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError) as error:
        load_config("pretrain", overrides=[override])
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_mask_patch_size_rule_in_one_place():
    """The mask patch rule (a divisor of the image size, a multiple of the model's patch size) was written in the
    recipe checks, in reconstruct and in the mask generator; the recipe's two messages did not name the sizes that
    fit. One rule (masking.check_mask_patch_size), one message naming the key, for recipes as for reconstruct."""
    from masking import check_mask_patch_size, mask_patch_sizes
    assert mask_patch_sizes(64, 4) == [4, 8, 16, 32, 64] and mask_patch_sizes(192, 32) == [32, 64, 96, 192]
    for size in range(1, 130):
        if size in mask_patch_sizes(64, 4):
            check_mask_patch_size(64, size, 4)
        else:
            with pytest.raises(ValueError, match=f"mask_patch_size {size} is not|by mask_patch_size {size}"):
                check_mask_patch_size(64, size, 4)
    for size in (12, 2, 128):
        with pytest.raises(ConfigError, match=f"^simmim.mask_patch_size={size}: expected a divisor of the model's "
                                              f"img_size 64 that is a multiple of its patch_size 4, one of 4, 8, 16, "
                                              f"32, 64$"):
            load_config("pretrain", overrides=[f"simmim.mask_patch_size={size}"])


def test_finetune_augmentation_keys():
    """RandAugment's keys were checked only when it was built, in its own words; labels_per_class=abc was a
    TypeError."""
    for override, message in (("data.randaug_ops=-1", "data.randaug_ops=-1: expected an integer >= 0 (0: off)"),
                              ("data.randaug_magnitude=11", "data.randaug_magnitude=11: expected a number in [0, 10]"),
                              ("data.randaug_magnitude_std=-1",
                               "data.randaug_magnitude_std=-1: expected a number >= 0"),
                              ("data.labels_per_class=abc", "data.labels_per_class=abc: expected an integer or null")):
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
            load_config("finetune", overrides=[override])
    assert load_config("finetune", overrides=["data.randaug_magnitude=9.5"]).data.randaug_magnitude == 9.5


def test_device_indices_on_the_cpu_and_plans_for_other_machines():
    """Device indices name GPUs: on the CPU they were a TypeError from Lightning. A plan (plan_memory) is for the
    GPUs of another machine: neither the accelerator nor the devices are checked against this one."""
    with pytest.raises(ConfigError, match=r"^trainer.devices=\[0\]: expected a number of processes on the CPU"):
        load_config("pretrain", overrides=["trainer.accelerator=cpu", "trainer.devices=[0]"])
    cfg = load_config("pretrain", "giant", ["trainer.accelerator=gpu", "trainer.devices=[0,1]"], here=False)
    assert list(cfg.trainer.devices) == [0, 1]


def test_runs_that_cannot_start_as_launched_are_one_line(monkeypatch):
    """Found by starting 2-rank runs: under torchrun with trainer.devices left at 1 each process trained alone in
    the same run directory (rank 1 ended in a traceback); trainer.num_nodes=2 on one machine waited forever; FSDP
    and trainer.devices=-1 on the CPU were tracebacks from every rank."""
    for overrides, message in ((["trainer.devices=-1"], "trainer.devices=-1: expected a number of processes on the "
                                                        "CPU (-1, every device, counts GPUs), e.g. trainer.devices=2"),
                               (["trainer.strategy=fsdp_grad_op"], "trainer.strategy=fsdp_grad_op needs GPUs"),
                               (["trainer.num_nodes=2"], "trainer.num_nodes=2 but this process was not started on "
                                                         "several nodes")):
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
            load_config("pretrain", overrides=["trainer.accelerator=cpu", *overrides])
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")  # torchrun --nproc-per-node=2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"^trainer.devices=1: expected the 2 processes per node torchrun started "
                                          r"\(--nproc-per-node=2\): set trainer.devices=2$"):
        load_config("pretrain", overrides=["trainer.accelerator=cpu"])
    assert load_config("pretrain", overrides=["trainer.accelerator=cpu", "trainer.devices=2"]).trainer.devices == 2
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.setenv("NODE_RANK", "1")  # started on each node by hand, as Lightning reads it
    assert load_config("pretrain", overrides=["trainer.accelerator=cpu", "trainer.num_nodes=2"]).trainer.num_nodes == 2
    with pytest.raises(ValueError, match=r"^img_size 64 does not fit window_size 5"):  # print_config printed it
        pretrain.main(["model.window_size=5", "print_config=true"])
    monkeypatch.delenv("NODE_RANK")  # printing a run's config checks nothing against this machine (a login node)
    assert pretrain.main(["recipe=giant", "trainer.accelerator=cpu", "trainer.num_nodes=4",
                          "print_config=true"]) is None


def test_good_values_pass():
    assert load_config("pretrain", overrides=["trainer.max_time={hours: 60}"]).trainer.max_time.hours == 60
    cfg = load_config("pretrain", overrides=["trainer.devices=auto", "trainer.precision=16", "resume=null",
                                             "optim.base_lr=1", "trainer.max_steps=10", "trainer.max_time=null",
                                             "trainer.val_check_interval=0.5", "eval.knn_max_images=100"])
    assert cfg.optim.base_lr == 1 and cfg.trainer.precision == 16
    for recipe in ("tiny", "giant"):
        load_config("pretrain", recipe)
        load_config("finetune", recipe)


def test_recipe_syntax_error_and_output_dir_file(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model:\n  depths: [2, 2\n")
    with pytest.raises(ConfigError, match=r"^.*bad.yaml, line 3: YAML syntax error \(did not find expected"):
        load_config("pretrain", str(recipe))
    with pytest.raises(ConfigError, match=r"output_dir=.*bad.yaml: .*bad.yaml is a file; expected a folder"):
        load_config("pretrain", overrides=[f"output_dir={recipe}"])


def test_script_prints_one_error_line_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pretrain.py", f"output_dir={tmp_path}", "data.batch_size=-1"])
    with pytest.raises(SystemExit) as exit:
        run_cli(pretrain.main)
    assert exit.value.code == "error: data.batch_size=-1: expected an integer > 0 (images per device)"
    assert not any(tmp_path.iterdir())


def write_images(folder, count):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        cv2.imwrite(str(folder / f"{i}.png"), np.full((8, 8, 3), 40 * i, np.uint8))


def test_list_labels_that_are_not_class_indices(tmp_path):
    write_images(tmp_path, 3)
    for bad in ("-1", "cat", "1.5", "99999999999999999999"):  # the last two: part of a missing path; OverflowError
        (tmp_path / "list.txt").write_text(f"0.png 0\n1.png {bad}\n2.png 1\n")
        with pytest.raises(ValueError, match=rf"list.txt line 2: label '{bad}' of 1.png is not a class index"):
            build_sources("list", 8, list_file=tmp_path / "list.txt")
    (tmp_path / "list.txt").write_bytes(b"0.png 0\n1.png 1\n\xff\xfe.png 1\n")  # was: no file, no line
    with pytest.raises(ValueError, match=r"list.txt line 3: not UTF-8 text \(invalid start byte\); save the list"):
        build_sources("list", 8, list_file=tmp_path / "list.txt")
    (tmp_path / "1 2.png").write_bytes((tmp_path / "1.png").read_bytes())  # a path whose last word is a number
    (tmp_path / "list.txt").write_text("0.png 0\n1 2.png 3\n2.png 1\n")
    assert sorted(label for _, label in sum(map(list, build_sources("list", 8, list_file=tmp_path / "list.txt")), [])
                  ) == [0, 1, 3]
    (tmp_path / "list.txt").write_text("0.png\n1 2.png\n")  # no labels: "1 2.png" is the path, not "1" labeled
    assert sorted(Path(path).name for path, _ in sum(map(list, build_sources("list", 8, list_file=tmp_path /
                                                                              "list.txt")), [])) == ["0.png", "1 2.png"]


@pytest.mark.parametrize("key, trained, recipe", [("norm_mode", "pre_norm", "res_post_norm"),
                                                  ("position_bias", "linear_cpb", "log_cpb")])
def test_finetune_refuses_a_model_that_reads_the_pretrained_weights_otherwise(tmp_path, key, trained, recipe):
    """An encoder pretrained pre-norm (or with linear CPB) loaded into the recipe's res-post-norm (log-CPB)
    classifier without an error: same shapes, another computation. Refused before the run directory is made."""
    torch.save({"model": {"encoder.patch_embed.proj.weight": torch.zeros(32, 3, 4, 4)},
                "config": {"model": {key: trained}}}, tmp_path / "encoder.pth")
    with pytest.raises(ConfigError, match=rf"^model.{key}={recipe}: pretrained=.*encoder.pth was trained with "
                                          rf"{key}={trained}, .* do not mean the same; set model.{key}={trained}$"):
        finetune_script.main([f"output_dir={tmp_path}/runs", f"pretrained={tmp_path / 'encoder.pth'}"])
    assert not (tmp_path / "runs").exists()


def test_resume_from_a_checkpoint_of_another_stage_or_model_is_refused(tmp_path):
    """resume=PATH of a fine-tuning checkpoint, or of another model: Lightning's state-dict error (hundreds of
    key names) after the run directory had its config, CSV and TensorBoard folders. Now one line, nothing written."""
    weight = torch.zeros(32, 3, 4, 4)
    torch.save({"state_dict": {"model.patch_embed.proj.weight": weight}, "loops": {}}, tmp_path / "classifier.ckpt")
    torch.save({"state_dict": {"simmim.encoder.patch_embed.proj.weight": weight}, "loops": {},
                "hyper_parameters": {"model": {"embed_dim": 32, "num_heads": [2, 2, 4, 8]}}}, tmp_path / "other.ckpt")
    torch.save({"state_dict": {"simmim.encoder.patch_embed.proj.weight": weight}, "loops": {},
                "hyper_parameters": {"model": {}, "base_lr": 0.1}}, tmp_path / "lr.ckpt")
    for name, message in (("lr.ckpt", "it was trained with optim.base_lr=0.1, this run asks for 0.008; a resumed run "
                                      "keeps the optimizer and lr schedule it saved"),  # the new lr was ignored
                          ("classifier.ckpt", "is a lightning-classifier checkpoint, not one of a pretraining run; "
                                              "pass a .ckpt of this stage's run directory, or resume=auto"),
                          ("other.ckpt", "it was trained with model.num_heads=[2, 2, 4, 8], this run asks for [2, 4, "
                                         "8, 16]; give the model values of that run")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            pretrain.main([f"output_dir={tmp_path}/runs", f"resume={tmp_path / name}"])
    assert not (tmp_path / "runs").exists()


def test_labels_checked_against_num_classes_before_training(tmp_path):
    for name in ("a", "b", "c"):
        write_images(tmp_path / "data" / name, 4)
    train, _ = build_sources("folder", 8, root=tmp_path / "data")
    with pytest.raises(ConfigError, match=r"model.num_classes=2: train has label 2 \(.*c/.\.png\), expected 0..1; "
                                          r"set model.num_classes=3 or fix the labels"):
        validate_labels(train, 2, "train")
    validate_labels(train, 3, "train")
    with pytest.raises(ConfigError, match="model.num_classes=2: the train split of data.source=folder has label 2"):
        finetune_script.main([f"output_dir={tmp_path}/runs", "pretrained=null", "data.source=folder",
                              f"data.root={tmp_path / 'data'}", "model.num_classes=2", "data.img_size=32",
                              "model.window_size=4"])
    assert not (tmp_path / "runs").exists()


def test_tool_options_are_checked_against_their_defaults():
    """The tools' key=value options (simmim.train.config.options_from_argv): a value of the wrong type for a
    typed default is one line (it was a TypeError deep in the tool), model.* keys follow SwinTransformerV2's
    arguments and the recipes' rules, null only for null defaults and `nullable` keys, numbers for a string
    default become strings."""
    schema = {"k": 20, "temperature": 0.07, "flag": False, "out": "features", "limit": None, "model": model_section()}
    for arg, message in (("k=abc", "k=abc: expected an integer, as the default 20"),
                         ("k=2.5", "k=2.5: expected an integer, as the default 20"),
                         ("temperature=warm", "temperature=warm: expected a number, as the default 0.07"),
                         ("flag=1", "flag=1: expected true or false, as the default false"),
                         ("model.img_size=abc", "model.img_size=abc: expected an integer or null"),
                         ("model.depths=[2,a]", "model.depths=[2, a]: expected a list of integers"),
                         ("model.window_size=0", "model.window_size=0: expected an integer > 0"),
                         ("model.attn_mode=dotted", "model.attn_mode=dotted: expected cosine or dot"),
                         ("k=", "k=null: expected an integer, as the default 20"),  # null only where it means
                         ("out=null", "out=null: expected a string, as the default features")):  # something
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
            options_from_argv(schema, [arg], "usage")
    cfg = options_from_argv(schema, ["temperature=1", "out=2024", "limit=abc", "model.depths=[2,2]",
                                     "model.img_size=null"], "")
    assert cfg.temperature == 1 and cfg.out == "2024" and cfg.limit == "abc" and cfg.model.img_size is None
    assert list(cfg.model.depths) == [2, 2] and options_from_argv(schema, ["k=null"], "", nullable=("k",)).k is None


def test_a_data_key_of_another_source_is_refused():
    """data.shards, data.root, data.list_file or data.val_shards set while data.source names another source was
    ignored: the run or the tool read the source's data (the embedded digits by default) without a word."""
    schema = {"data": {"source": "digits", "root": None, "list_file": None, "shards": None, "val_shards": None}}
    for args, message in ((["data.val_shards=/v"], "data.val_shards=/v is read by data.source=shards only, and "
                                                   "data.source=digits; add data.source=shards"),
                          (["data.source=shards", "data.shards=/s", "data.list_file=l.txt"],
                           "data.list_file=l.txt is read by data.source=list only, and data.source=shards")):
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
            options_from_argv(schema, args, "usage")
    assert options_from_argv(schema, ["data.source=folder", "data.root=/r"], "").data.root == "/r"
    cfg = load_config("finetune", "base", ["data.source=shards", "data.shards=/s"])  # a recipe's folder source
    assert cfg.data.source == "shards"
    with pytest.raises(ConfigError, match=r"^data.root=/r is read by data.source=folder only, and data.source=shards"):
        load_config("finetune", "base", ["data.source=shards", "data.shards=/s", "data.root=/r"])
    with pytest.raises(ConfigError, match=r"^data.source=Folder: expected one of folder, list, digits, shards$"):
        load_config("pretrain", overrides=["data.source=Folder", "data.root=/r"])  # was: "data.root is read by ..."


def test_a_data_location_of_the_wrong_kind_is_named(tmp_path):
    """data.root a file (was "does not exist"), data.shards an http folder (was "invalid header")."""
    from simmim.data.shards import shard_urls

    (tmp_path / "images.txt").write_text("a.jpg\n")
    with pytest.raises(FileNotFoundError, match=r"data.root=.*images.txt is a file; pass a folder of images \(a file "
                                                r"that lists images: data.source=list data.list_file=.*images.txt\)"):
        build_sources("folder", 32, root=tmp_path / "images.txt")
    for spec in ("http://127.0.0.1:9/train/", "http://127.0.0.1:9/train"):
        with pytest.raises(ValueError, match=rf"^data.shards={spec} looks like an http folder, which cannot be listed; "
                                             r"give its shards as a brace pattern \(http://127.0.0.1:9/train/train-"
                                             r"\{000000..000099\}.tar\) or one .tar URL$"):
            shard_urls(spec)


def test_an_error_raised_in_a_dataloader_worker_is_still_one_line(monkeypatch):
    """DataLoader re-raises a worker's exception with the worker's traceback in its message; the scripts print
    the original message alone."""
    from torch._utils import ExceptionWrapper

    def main(argv):
        try:
            raise ValueError("101 files in a row failed to decode (last: x.jpg, one of 3)")
        except ValueError:
            ExceptionWrapper(where="in DataLoader worker process 0").reraise()

    monkeypatch.setattr(sys, "argv", ["pretrain.py"])
    with pytest.raises(SystemExit) as exit:
        run_cli(main)
    assert exit.value.code == "error: 101 files in a row failed to decode (last: x.jpg, one of 3)"


def test_a_lightning_configuration_error_is_one_line(monkeypatch):
    """Lightning's MisconfigurationException (a Trainer value it refuses in the fit) was a traceback."""
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    def main(argv):
        raise MisconfigurationException("`limit_train_batches` must be in [0.0, 1.0] or an int")

    monkeypatch.setattr(sys, "argv", ["finetune.py"])
    with pytest.raises(SystemExit) as exit:
        run_cli(main)
    assert exit.value.code == "error: `limit_train_batches` must be in [0.0, 1.0] or an int"


def test_a_path_that_cannot_be_written_is_one_line(monkeypatch):
    """output_dir on a read-only mount or where the user may not write was an OSError traceback."""
    import errno

    monkeypatch.setattr(sys, "argv", ["pretrain.py"])
    for code, name, fix in ((errno.EROFS, "Read-only file system", "give a folder on a writable disk"),
                            (errno.EACCES, "Permission denied", "give a path you may read or write, or change its")):
        def main(argv, code=code, name=name):
            raise OSError(code, name, "/mnt/ro/runs/r")
        with pytest.raises(SystemExit) as exit:
            run_cli(main)
        assert exit.value.code.startswith(f"error: {name}: /mnt/ro/runs/r; {fix}")


def test_a_folder_named_like_a_checkpoint_is_refused_at_start(tmp_path):
    """checkpoints/last.ckpt made a folder: the start warned and trained, the first save failed an epoch later
    (IsADirectoryError)."""
    (tmp_path / "default" / "checkpoints" / "last.ckpt").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"checkpoints/last.ckpt is a folder that holds no DeepSpeed checkpoint, "
                                          r"where the run saves its checkpoints; move it away"):
        pretrain.main([f"output_dir={tmp_path}"])
