import json

from simmim.tools import benchmark_data


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
