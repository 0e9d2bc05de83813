"""scripts/export.py: timm (against a fixture made by real timm), transformers (loaded by real transformers),
the official layout, and safetensors files read back by every checkpoint reader."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY, randomize_, tiny_swinv2
from simmim.models.checkpoint import (checkpoint_weights, detect_layout, encoder_from_checkpoint, load_pretrained,
                                      read_checkpoint, saved_simmim_config, simmim_from_checkpoint)
from simmim.models.swinv2 import SwinTransformerV2
from simmim.pretrain import SimMIMPretrainModule
from simmim.tools.export import encoder_for_export, hf_config, main, timm_kwargs, to_timm

DATA = Path(__file__).parent / "data"
ENCODER_CFG = {k: (list(v) if isinstance(v, tuple) else v) for k, v in TINY.items() if k != "num_classes"}


def classifier_file(tmp_path, num_classes: int = 10, **overrides) -> tuple[torch.nn.Module, Path]:
    """A fine-tuned classifier as our official-layout .pth with its config (what format=official writes)."""
    model = randomize_(tiny_swinv2(num_classes=num_classes, **overrides), seed=5).eval()
    config = {**ENCODER_CFG, **overrides, "num_classes": num_classes}
    path = tmp_path / "classifier.pth"
    torch.save({"model": model.state_dict(), "config": {"model": config}}, path)
    return model, path


# ------------------------------------------------------------------------------------------------- timm
def timm_fixture() -> dict:
    return torch.load(DATA / "timm_swinv2.pt", weights_only=True)


def test_timm_fixture_loads_into_ours_and_gives_timms_outputs():
    """Real timm's state dict (tests/data/make_timm_fixture.py) read by the timm reader: our model gives timm's
    logits and features."""
    fixture = timm_fixture()
    model = timm_settings_model(fixture["kwargs"])
    report = load_pretrained(model, fixture["state_dict"])
    assert report.layout == "timm" and not report.missing and not report.unexpected and not report.reinitialized
    with torch.no_grad():
        torch.testing.assert_close(model(fixture["input"]), fixture["logits"], rtol=0, atol=1e-4)
        features = model.forward_head(model.forward_features(fixture["input"]), pre_logits=True)
        torch.testing.assert_close(features, fixture["features"], rtol=0, atol=1e-4)


def timm_settings_model(kwargs: dict) -> SwinTransformerV2:
    """Our model with the settings timm's was built with."""
    return SwinTransformerV2(**kwargs, drop_path_rate=0.0).eval()


def test_timm_export_is_the_state_dict_timm_has(tmp_path):
    """Ours -> timm gives exactly timm's keys (what strict=True checks), shapes and values; the settings
    printed for timm are the ones the fixture's model was built with."""
    fixture = timm_fixture()
    model = timm_settings_model(fixture["kwargs"])
    load_pretrained(model, fixture["state_dict"])
    config = {**fixture["kwargs"], "drop_path_rate": 0.0}
    main([f"checkpoint={write_official(tmp_path, model, config)}", "format=timm", f"out={tmp_path / 'm.safetensors'}"])
    exported = load_file(tmp_path / "m.safetensors")
    assert sorted(exported) == sorted(fixture["timm_keys"])
    for key, value in fixture["state_dict"].items():
        assert torch.equal(exported[key], value), key
    metadata = safetensors_metadata(tmp_path / "m.safetensors")
    assert json.loads(metadata["timm_kwargs"]) == fixture["kwargs"]


def write_official(tmp_path, model, config) -> Path:
    path = tmp_path / "ours.pth"
    torch.save({"model": model.state_dict(), "config": {"model": config}}, path)
    return path


def safetensors_metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        return file.metadata()


def test_timm_export_reads_back_without_model_keys(tmp_path):
    """The exported .safetensors is a checkpoint like any other: every reader takes it, and the config in its
    metadata rebuilds the model."""
    model, path = classifier_file(tmp_path)
    main([f"checkpoint={path}", "format=timm", f"out={tmp_path / 'timm.safetensors'}"])
    ckpt = read_checkpoint(tmp_path / "timm.safetensors")
    assert detect_layout(ckpt) == "timm"
    encoder, config, report = encoder_from_checkpoint(tmp_path / "timm.safetensors")
    assert config["window_size"] == 4 and not report.missing
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(encoder.eval().forward_features(x), model.forward_features(x), rtol=0, atol=0)


def test_bare_timm_safetensors_is_read(tmp_path):
    """A timm safetensors file as timm or the Hub write it (no metadata of ours)."""
    source = randomize_(tiny_swinv2(), seed=6)
    save_file(to_timm(source.state_dict()), str(tmp_path / "model.safetensors"))
    model = tiny_swinv2()
    report = load_pretrained(model, tmp_path / "model.safetensors")
    assert report.layout == "timm" and not report.missing and not report.unexpected
    assert torch.equal(model.head.weight, source.head.weight)


def test_unreadable_safetensors_is_one_clear_error(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"cannot read .*bad.safetensors as safetensors"):
        read_checkpoint(tmp_path / "bad.safetensors")
    # a file saved in one format and named for the other: said so with the name to give it (were the readers'
    # "header too large" and "unpickling stack underflow")
    torch.save({"model": {"w": torch.zeros(2)}}, tmp_path / "torch.safetensors")
    with pytest.raises(ValueError, match=r"torch.safetensors is a torch.save file named .safetensors; rename it to "
                                         r"torch.pth$"):
        read_checkpoint(tmp_path / "torch.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "tensors.pth"))
    with pytest.raises(ValueError, match=r"tensors.pth is a safetensors file named .pth; rename it to "
                                         r"tensors.safetensors$"):
        read_checkpoint(tmp_path / "tensors.pth")


def test_timm_and_hf_refuse_settings_they_do_not_have():
    for target, check in (("timm", timm_kwargs), ("transformers", hf_config)):
        with pytest.raises(ValueError, match=rf"{target} has no SwinV2 with norm_mode='pre_norm'"):
            check({**ENCODER_CFG, "norm_mode": "pre_norm"})


# ---------------------------------------------------------------------------------------- transformers
@pytest.mark.parametrize("num_classes", [0, 10])
def test_hf_export_loads_in_transformers_and_matches(tmp_path, num_classes):
    import transformers  # the `test` extra installs it
    model, path = classifier_file(tmp_path, num_classes=num_classes, window_size=8,
                                  pretrained_window_sizes=[4, 4, 4, 2])
    main([f"checkpoint={path}", "format=hf", f"out={tmp_path / 'hf'}"])
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    hf, info = transformers.Swinv2Model.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert set(info["unexpected_keys"]) == ({"classifier.weight", "classifier.bias"} if num_classes else set())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = model.forward_features(x)
        out = hf.eval()(pixel_values=x)
        torch.testing.assert_close(out.last_hidden_state, ours.flatten(1, 2), rtol=0, atol=1e-4)
        torch.testing.assert_close(out.pooler_output, ours.mean(dim=(1, 2)), rtol=0, atol=1e-4)
        if num_classes:
            classifier = transformers.Swinv2ForImageClassification.from_pretrained(tmp_path / "hf").eval()
            torch.testing.assert_close(classifier(pixel_values=x).logits, model(x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("pretrained", [None, [4, 4, 2, 1]])
def test_hf_export_of_a_stage_with_a_one_by_one_window(tmp_path, pretrained):
    """A 32 px model's last stage is 1x1 (window 1), and an encoder pretrained there hands on pretrained window 1:
    transformers (and timm, and the official code) divide its CPB offsets by window - 1 = 0, and every output
    after it was NaN, without a word. The export writes 2 there, whose divisor 1 is ours."""
    import transformers
    model, path = classifier_file(tmp_path, num_classes=0, img_size=32, pretrained_window_sizes=pretrained)
    main([f"checkpoint={path}", "format=hf", f"out={tmp_path / 'hf'}"])
    # the windows the encoder was built with: [4, 4, 2, 1] either way (the checkpoint's own, else its windows)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["pretrained_window_sizes"] == [4, 4, 2, 2]
    assert timm_kwargs({**ENCODER_CFG, "img_size": 32, "pretrained_window_sizes": pretrained})[
        "pretrained_window_sizes"] == ([0, 0, 0, 2] if pretrained is None else [4, 4, 2, 2])
    hf = transformers.Swinv2Model.from_pretrained(tmp_path / "hf").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        theirs = hf(pixel_values=x).last_hidden_state
        assert torch.isfinite(theirs).all()
        torch.testing.assert_close(theirs, model.forward_features(x).flatten(1, 2), rtol=0, atol=1e-4)


def test_hf_export_of_a_pretraining_checkpoint(tmp_path):
    """Our SimMIM Lightning checkpoint goes out whole, as transformers' Swinv2ForMaskedImageModeling (before: the
    encoder alone, the mask token and decoder left behind): its reconstruction of a masked image is ours, and
    Swinv2Model takes the encoder from the same folder. Read back, it is the same SimMIM."""
    import transformers
    module = randomize_(SimMIMPretrainModule(model=ENCODER_CFG), seed=7)
    masking = {"mask_patch_size": 16, "mask_ratio": 0.5, "mask_kind": "random"}
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
            "datamodule_hyper_parameters": masking}
    torch.save(ckpt, tmp_path / "last.ckpt")
    main([f"checkpoint={tmp_path / 'last.ckpt'}", "format=hf", f"out={tmp_path / 'hf'}"])
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [
        "Swinv2ForMaskedImageModeling"]
    # the masking settings travel along (reconstruct.py used its defaults for them: other masks)
    assert saved_simmim_config(read_checkpoint(tmp_path / "hf")) == {**masking, "norm_target_patch_size": None}
    mim, info = transformers.Swinv2ForMaskedImageModeling.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf = transformers.Swinv2Model.from_pretrained(tmp_path / "hf").eval()
    simmim = module.simmim.eval()
    x, mask = torch.randn(2, 3, 64, 64), (torch.rand(2, 16, 16) < 0.6).float()
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).last_hidden_state,
                                   simmim.encoder.forward_features(x).flatten(1, 2), rtol=0, atol=1e-4)
        theirs = mim.eval()(pixel_values=x, bool_masked_pos=mask.flatten(1).bool()).reconstruction
        torch.testing.assert_close(theirs, simmim.reconstruct(x, mask), rtol=0, atol=1e-4)
        again, _ = simmim_from_checkpoint(tmp_path / "hf")
        torch.testing.assert_close(again.eval().reconstruct(x, mask), simmim.reconstruct(x, mask), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["Swinv2ForImageClassification", "Swinv2Model", "Swinv2ForMaskedImageModeling"])
def test_a_transformers_folder_is_read_with_its_config_and_gives_its_outputs(tmp_path, kind):
    """A transformers Swinv2 (random weights, not its init; window 8 over pretrained windows 4) saved with
    save_pretrained in shards: our readers take the folder, build the model from config.json and give transformers' outputs
    (the classifier's logits; the MIM model's encoder, and its reconstruction as a SimMIM)."""
    import transformers
    config = transformers.Swinv2Config(image_size=64, patch_size=4, embed_dim=16, depths=[2, 2, 2, 2],
                                       num_heads=[2, 2, 4, 8], window_size=8, pretrained_window_sizes=[4, 4, 4, 2],
                                       num_labels=5)
    hf = randomize_(getattr(transformers, kind)(config), seed=3).eval()
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")  # as large models are saved: in shards
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 1
    model, built = encoder_for_export(tmp_path / "hf")
    assert detect_layout(read_checkpoint(tmp_path / "hf")) == "hf"
    assert built["window_size"] == 8 and built["pretrained_window_sizes"] == [4, 4, 4, 2]
    assert built["num_classes"] == (5 if kind == "Swinv2ForImageClassification" else 0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        if kind == "Swinv2ForImageClassification":
            torch.testing.assert_close(model.eval()(x), hf(pixel_values=x).logits, rtol=0, atol=1e-4)
        else:
            encoder = hf if kind == "Swinv2Model" else hf.swinv2
            torch.testing.assert_close(model.eval().forward_features(x).flatten(1, 2),
                                       encoder(pixel_values=x).last_hidden_state, rtol=0, atol=1e-4)
    if kind == "Swinv2ForMaskedImageModeling":  # a SimMIM checkpoint: mask token and decoder read too
        simmim, _ = simmim_from_checkpoint(tmp_path / "hf")
        mask = (torch.rand(2, 16, 16) < 0.6).float()
        with torch.no_grad():
            torch.testing.assert_close(simmim.eval().reconstruct(x, mask), hf(
                pixel_values=x, bool_masked_pos=mask.flatten(1).bool()).reconstruction, rtol=0, atol=1e-4)
    else:
        with pytest.raises(ValueError, match="a hf checkpoint has no SimMIM decoder; pass a pretraining checkpoint"):
            simmim_from_checkpoint(tmp_path / "hf")


# ---------------------------------------------------------------------------------------------- official
def test_official_export_of_pretraining_and_classifier(tmp_path):
    module = randomize_(SimMIMPretrainModule(model=ENCODER_CFG), seed=8)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, tmp_path / "p.ckpt")
    main([f"checkpoint={tmp_path / 'p.ckpt'}", "format=official", f"out={tmp_path / 'simmim.pth'}"])
    exported = torch.load(tmp_path / "simmim.pth", weights_only=True)
    assert detect_layout(exported) == "exported-simmim"
    for key, value in module.simmim.state_dict().items():
        assert torch.equal(exported["model"][key], value), key

    model, path = classifier_file(tmp_path)
    main([f"checkpoint={path}", "format=official", f"out={tmp_path / 'swinv2.pth'}"])
    exported = torch.load(tmp_path / "swinv2.pth", weights_only=True)
    assert detect_layout(exported) == "official-swinv2"
    weights = checkpoint_weights(exported)
    assert torch.equal(weights["head.weight"], model.head.weight)
    rebuilt, config = encoder_for_export(tmp_path / "swinv2.pth")
    assert config["num_classes"] == 10


def test_export_arguments_are_checked(tmp_path):
    from simmim.train.config import ConfigError

    with pytest.raises(ConfigError, match="checkpoint=, format= and out= are required"):
        main(["format=timm"])
    with pytest.raises(ConfigError, match="format=onnx is not one of timm, hf, official"):
        main([f"checkpoint={tmp_path}", "format=onnx", "out=x"])
    with pytest.raises(FileNotFoundError, match="missing.pth does not exist"):
        main([f"checkpoint={tmp_path / 'missing.pth'}", "format=timm", "out=x.safetensors"])
    with pytest.raises(FileNotFoundError, match="is a folder without config.json; pass the path of a .ckpt"):
        main([f"checkpoint={tmp_path}", "format=timm", "out=x.safetensors"])
    (tmp_path / "config.json").write_text('{"model_type": "vit"}')
    with pytest.raises(ValueError, match="has model_type 'vit'; pass a transformers Swinv2 folder"):
        main([f"checkpoint={tmp_path}", "format=timm", "out=x.safetensors"])
    for key, value in (("hidden_act", '"relu"'), ("layer_norm_eps", "0.01")):  # were silently taken as ours
        (tmp_path / "config.json").write_text(f'{{"model_type": "swinv2", "{key}": {value}}}')
        with pytest.raises(ValueError, match=f"has {key}=.*; this encoder has .* only"):
            main([f"checkpoint={tmp_path}", "format=timm", "out=x.safetensors"])
    (tmp_path / "config.json").write_text('{"model_type": "swinv2"}')
    with pytest.raises(FileNotFoundError, match=r"has no model.safetensors or pytorch_model.bin \(nor their "):
        main([f"checkpoint={tmp_path}", "format=timm", "out=x.safetensors"])


def test_export_does_not_write_over_an_existing_out_unless_told(tmp_path):
    """A file that exists (here the user's other weights) or a folder with files is left as it is: one line naming
    out= and overwrite=true; an empty folder is written into; overwrite=true replaces."""
    from simmim.train.config import ConfigError

    _, path = classifier_file(tmp_path)
    theirs = tmp_path / "theirs.safetensors"
    theirs.write_bytes(b"the user's weights")
    with pytest.raises(ConfigError, match=f"out={theirs}: the file exists; give another out= or add overwrite=true"):
        main([f"checkpoint={path}", "format=timm", f"out={theirs}"])
    assert theirs.read_bytes() == b"the user's weights"
    main([f"checkpoint={path}", "format=timm", f"out={theirs}", "overwrite=true"])
    assert "head.fc.weight" in load_file(theirs)

    (tmp_path / "hf").mkdir()
    main([f"checkpoint={path}", "format=hf", f"out={tmp_path / 'hf'}"])  # empty: nothing to lose
    config = (tmp_path / "hf" / "config.json").read_text()
    with pytest.raises(ConfigError, match="hf: the folder exists; give another out="):
        main([f"checkpoint={path}", "format=hf", f"out={tmp_path / 'hf'}", "model.drop_path_rate=0.3"])
    assert (tmp_path / "hf" / "config.json").read_text() == config

    # overwrite=true of a folder that save_pretrained wrote in shards: the old weights go (they stayed beside the
    # new model.safetensors), the user's other files stay
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict(zip("ab", shards))}))
    for name in [*shards, "pytorch_model.bin", "README.md"]:
        (tmp_path / "hf" / name).write_bytes(b"old")
    main([f"checkpoint={path}", "format=hf", f"out={tmp_path / 'hf'}", "overwrite=true"])
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_out_names_the_format_our_readers_expect(tmp_path):
    """The readers go by the suffix: a timm export named .pth, or an official one named .safetensors, could not be
    read back (written without a word before)."""
    from simmim.train.config import ConfigError

    _, path = classifier_file(tmp_path)
    for fmt, out, fix in (("timm", "w.pth", "w.safetensors"), ("timm", "w", "w.safetensors"),
                          ("official", "w.safetensors", "w.pth")):
        with pytest.raises(ConfigError, match=f"out={tmp_path / out}: format={fmt} writes .* e.g. out="
                                              f"{tmp_path / fix}$"):
            main([f"checkpoint={path}", f"format={fmt}", f"out={tmp_path / out}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([Path(path).name])
    (tmp_path / "fold").mkdir()  # was os.replace's IsADirectoryError, with overwrite=true too
    for overwrite in ("false", "true"):
        with pytest.raises(ConfigError, match=f"^out={tmp_path / 'fold'} is a folder; format=official writes a file, "
                                              f"e.g. out={tmp_path / 'fold' / 'swinv2.pth'}$"):
            main([f"checkpoint={path}", "format=official", f"out={tmp_path / 'fold'}", f"overwrite={overwrite}"])


def test_ema_weights_are_exported_when_asked(tmp_path, capsys):
    """A fine-tuning checkpoint of train.ema_decay holds the live (model.*) and the EMA weights (ema.*): every
    reader took the live ones without a word. The export says the EMA ones are there, and ema=true takes them."""
    live, _ = classifier_file(tmp_path)
    ema = randomize_(tiny_swinv2(num_classes=10), seed=6)
    state = {**{f"model.{k}": v for k, v in live.state_dict().items()},
             **{f"ema.{k}": v for k, v in ema.state_dict().items()}}
    config = {**ENCODER_CFG, "num_classes": 10}
    torch.save({"state_dict": state, "hyper_parameters": {"model": config}}, tmp_path / "last.ckpt")
    for flag, expected in (("false", live), ("true", ema)):
        main([f"checkpoint={tmp_path / 'last.ckpt'}", "format=official", f"out={tmp_path / flag}.pth", f"ema={flag}"])
        exported = torch.load(tmp_path / f"{flag}.pth", weights_only=True)["model"]
        assert all(torch.equal(exported[k], v) for k, v in expected.state_dict().items() if k in exported)
    assert "note: the checkpoint also holds EMA weights (train.ema_decay); ema=true exports those" in (
        capsys.readouterr().out)
    with pytest.raises(ValueError, match=r"the checkpoint holds no EMA weights .*; drop ema=true"):
        main([f"checkpoint={tmp_path / 'classifier.pth'}", "format=official", f"out={tmp_path / 'x.pth'}", "ema=true"])


def test_official_checkpoint_through_hf_gives_the_official_logits(tmp_path):
    """The official implementation's weights and outputs (tests/data/swinv2_official_w8_pt4.pt, window 8 over
    pretrained windows 4): exported with model.* keys, transformers reproduces the official logits, and so does
    our encoder built from the exported folder."""
    import transformers
    official = torch.load(DATA / "swinv2_official_w8_pt4.pt", weights_only=True)
    main([f"checkpoint={DATA / 'swinv2_official_w8_pt4.pt'}", "format=hf", f"out={tmp_path / 'hf'}",
          "model.embed_dim=16", "model.depths=[2,2,2,2]", "model.num_heads=[2,2,4,8]", "model.img_size=64",
          "model.window_size=8", "model.pretrained_window_sizes=[4,4,4,2]"])
    classifier = transformers.Swinv2ForImageClassification.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        logits = classifier(pixel_values=official["input"]).logits
        torch.testing.assert_close(logits, official["logits"], rtol=0, atol=1e-4)
        model, _ = encoder_for_export(tmp_path / "hf")  # and back: the folder read by us
        torch.testing.assert_close(model.eval()(official["input"]), official["logits"], rtol=0, atol=1e-4)


def test_timm_hub_folder_is_read(tmp_path):
    """A timm Hub folder (config.json with `architecture`, model.safetensors; was "model_type None"): the model comes
    from its model_args (newer timm writes them), and the features are timm's."""
    fixture = timm_fixture()
    kwargs = fixture["kwargs"]
    (tmp_path / "hub").mkdir()
    save_file(fixture["state_dict"], str(tmp_path / "hub" / "model.safetensors"))
    (tmp_path / "hub" / "config.json").write_text(json.dumps({
        "architecture": "swinv2_tiny_window8_256", "num_classes": kwargs["num_classes"], "model_args": kwargs,
        "pretrained_cfg": {"input_size": [3, kwargs["img_size"], kwargs["img_size"]], "classifier": "head.fc"}}))
    encoder, config, report = encoder_from_checkpoint(tmp_path / "hub")
    encoder.eval()
    assert report.layout == "timm" and not report.missing and config["pretrained_window_sizes"] == [4, 4, 4, 2]
    with torch.no_grad():
        features = encoder.forward_head(encoder.forward_features(fixture["input"]), pre_logits=True)
    torch.testing.assert_close(features, fixture["features"], rtol=0, atol=1e-4)


def test_timm_architecture_names_give_the_paper_models():
    """Older Hub folders hold no model_args: the architecture's name and the input size give the model."""
    from simmim.models.checkpoint import timm_folder_model

    config = {"architecture": "swinv2_base_window12to16_192to256", "num_classes": 1000,
              "pretrained_cfg": {"input_size": [3, 256, 256]}}
    assert timm_folder_model(config) == {"embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32],
                                         "img_size": 256, "window_size": 16, "num_classes": 1000,
                                         "pretrained_window_sizes": [12, 12, 12, 6]}
    model = timm_folder_model({"architecture": "swinv2_large_window12_192", "num_classes": 0})
    assert (model["embed_dim"], model["img_size"], model["window_size"]) == (192, 192, 12)
    assert "pretrained_window_sizes" not in model  # the windows it runs at (filled in by model_config)
    with pytest.raises(ValueError, match=r"config.json is a timm model folder of architecture 'swinv2_cr_tiny_384'; "
                                         r"only timm's swinv2_\{tiny,small,base,large\}_window\* models"):
        timm_folder_model({"architecture": "swinv2_cr_tiny_384"})
