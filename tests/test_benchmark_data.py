import json

import pytest

from conftest import assert_kept_beside
from simmim.tools import benchmark_data
from simmim.train.config import ConfigError


def test_benchmark_data_runs_every_pipeline_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    benchmark_data.main(["images=8", "rounds=1", "image_sizes=[[64,48]]", "batch_size=4", "pretrain_size=32",
                         "finetune_size=32", "short_side=24", f"work={tmp_path / 'work'}", f"out={out}"])
    results = json.loads(out.read_text())["results"]["64x48"]
    for stage in ("pretrain", "finetune"):
        assert set(results[stage]) == {"baseline", "folder", "shards", "shards_small"}
        assert all(row["images_per_s"] > 0 and len(row["rounds"]) == 1 for row in results[stage].values())
    assert results["pretrain"]["baseline"]["vs_baseline"] == 1.0 and results["decode_ms"]["full"] > 0
    assert "cores to feed" in capsys.readouterr().out

    # more images in the same work folder: shards of their own (it once reused the 8-image shards); the first
    # result is kept under a dated name (it was written over)
    earlier, written = out.read_bytes(), out.stat().st_mtime
    benchmark_data.main(["images=12", "rounds=1", "image_sizes=[[64,48]]", "batch_size=4", "pretrain_size=32",
                         "finetune_size=32", "short_side=24", f"work={tmp_path / 'work'}", f"out={out}"])
    assert json.loads(out.read_text())["config"]["images"] == 12
    assert_kept_beside(out, earlier, written)
    assert "kept the earlier bench.json as " in capsys.readouterr().err


@pytest.mark.parametrize("arg, message", [
    ("image_sizes=[[10]]", r"image_sizes=\[\[10\]\] must be a list of \[width, height\]"),
    ("image_sizes=[[0,0]]", r"image_sizes=\[\[0, 0\]\] must be a list of \[width, height\]"),
    ("pretrain_size=250", "pretrain_size=250 must be a multiple of the mask patch size 32"),
    ("gpu_images_per_s=0", "gpu_images_per_s=0 must be a positive number"),
    ("images=abc", "images=abc: expected an integer"),
])
def test_bad_options_are_one_line(arg, message):
    with pytest.raises(ConfigError, match=message):
        benchmark_data.main([arg])


def test_work_and_out_must_be_a_folder_and_a_file(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ConfigError, match="work=.*taken: .*taken is a file; pass a folder"):
        benchmark_data.main([f"work={tmp_path / 'taken'}"])
    with pytest.raises(ConfigError, match="out=.* is a folder; pass the path of a .json file"):
        benchmark_data.main([f"out={tmp_path}"])
    with pytest.raises(ConfigError, match="out=.*taken: the file exists and is not a result of this benchmark"):
        benchmark_data.main([f"out={tmp_path / 'taken'}"])  # was replaced by the JSON
    assert (tmp_path / "taken").read_text() == "x"
    with pytest.raises(ConfigError, match="quality=101 must be a JPEG quality from 1 to 100"):
        benchmark_data.main(["quality=101"])
