"""simmim.cli: keeping_earlier (the measuring tools' writes, which keep an earlier result under a dated name) and
run_cli's rank before a Trainer exists."""
import importlib
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from lightning_utilities.core.rank_zero import rank_zero_only
from pytorch_lightning.utilities import rank_zero_warn

from conftest import assert_kept_beside
from simmim.cli import keeping_earlier, run_cli
from simmim.train.config import ConfigError
from simmim.train.run_dir import utc_stamp


def test_earlier_files_move_aside_with_one_stamp_and_a_line(tmp_path, capsys):
    table, plot = tmp_path / "table.csv", tmp_path / "table.png"
    table.write_text("old table")
    plot.write_text("old plot")
    os.utime(table, (1e9, 1e9))
    os.utime(plot, (1e9 + 2.5, 1e9 + 2.5))  # written a little later in the same run: its time names both
    with keeping_earlier(table, plot) as (table_tmp, plot_tmp):
        table_tmp.write_text("new table")
        plot_tmp.write_text("new plot")
    assert_kept_beside(table, b"old table", 1e9 + 2.5)
    assert_kept_beside(plot, b"old plot", 1e9 + 2.5)
    stamp = utc_stamp(1e9 + 2.5)
    assert stamp == "2001-09-09T01-46-42.500000Z"
    assert capsys.readouterr().err == (f"kept the earlier table.csv as {tmp_path / f'table.{stamp}.csv'}\n"
                                       f"kept the earlier table.png as {tmp_path / f'table.{stamp}.png'}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["table.csv", "table.png", f"table.{stamp}.csv", f"table.{stamp}.png"])


def test_a_taken_dated_name_is_not_written_over(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text("second")
    os.utime(path, (1e9, 1e9))
    taken = tmp_path / f"bench.{utc_stamp(1e9)}.json"
    taken.write_text("first")  # e.g. copied back with its time
    with keeping_earlier(path) as (tmp,):
        tmp.write_text("third")
    assert taken.read_text() == "first" and path.read_text() == "third"
    assert (tmp_path / f"bench.{utc_stamp(1e9)}-2.json").read_text() == "second"


def test_a_failing_write_moves_nothing(tmp_path, capsys):
    path = tmp_path / "plan.json"
    path.write_text("earlier")
    with pytest.raises(RuntimeError), keeping_earlier(path) as (tmp,):
        tmp.write_text("half")
        raise RuntimeError
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"] and path.read_text() == "earlier"
    assert capsys.readouterr().err == ""


def test_a_first_write_has_nothing_to_keep(tmp_path, capsys):
    with keeping_earlier(tmp_path / "new" / "plan.json") as (tmp,):
        tmp.write_text("plan")
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["plan.json"] and capsys.readouterr().err == ""


def test_a_folder_at_the_result_path_is_one_line_and_stays(tmp_path):
    """A folder where the result goes was moved aside as if it were an earlier result."""
    (tmp_path / "out.json").mkdir()
    with pytest.raises(ConfigError, match=r"out.json is a folder .*, where the result is written; move it away"):
        with keeping_earlier(tmp_path / "out.json") as (tmp,):
            tmp.write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


@pytest.mark.parametrize("env, says", [({"NODE_RANK": "1", "LOCAL_RANK": "0"}, False),  # node 1's main process
                                       ({"OMPI_COMM_WORLD_RANK": "3"}, False), ({}, True)])
def test_what_rank_0_says_before_a_trainer_goes_by_the_launchers_rank(monkeypatch, env, says):
    """Lightning's own guess of the rank (RANK, LOCAL_RANK, SLURM_PROCID) made node 1's main process and MPI ranks
    warn like rank 0 before a Trainer existed (the resume checks' warnings)."""
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK",
                 "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(rank_zero_only, "rank", 0)  # restored after the test
    monkeypatch.setattr("sys.argv", ["script"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_cli(lambda argv: rank_zero_warn("a resume check's warning"))
    assert [str(w.message) for w in caught] == (["a resume check's warning"] if says else [])


def test_a_closed_stdout_ends_a_script_quietly():
    """`scripts/pretrain.py --help | head -3`: head leaves before the keys are printed, and the script ended with a
    BrokenPipeError traceback (and Python's second one at exit's flush). Now it stops without a word."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "pretrain.py"
    proc = subprocess.Popen([sys.executable, str(script), "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the script has imported torch and printed: every write finds no reader
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err[-2000:]


def test_a_result_path_on_a_disk_that_cannot_be_written_is_one_line_before_the_work(tmp_path, monkeypatch):
    """A read-only disk failed the write after the measurement (a GPU benchmark's minutes lost)."""
    from simmim.cli import check_result_file, json_with

    # a folder to be made, under one that can be written to
    check_result_file(tmp_path / "new" / "out.json", json_with("rows"), "tool")
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(tmp_path))  # as on a read-only mount
    with pytest.raises(ConfigError, match=rf"^out={tmp_path}/new/out.json: {tmp_path} cannot be written to; give a "
                                          r"path on a writable disk"):
        check_result_file(tmp_path / "new" / "out.json", json_with("rows"), "tool")


@pytest.mark.parametrize("tool, args, key, what", [
    ("simmim.tools.plan_memory", ["recipe=default"], "json", "memory plan"),
    ("simmim.tools.gpu_check", ["device=cpu", "batch_size=0"], "out", "GPU check"),  # batch_size: refused after
    ("simmim.tools.benchmark", ["device=cpu", "configs=[none]"], "out", "benchmark"),  # configs: refused after
    ("simmim.tools.benchmark_data", [], "out", "benchmark"),
    ("simmim.tools.signal_propagation", ["checkpoint=none.pth"], "out_dir", "signal propagation measurement"),
    ("finetune.window_transfer", ["checkpoint=none.pth"], "out_dir", "window transfer measurement"),
])
def test_a_file_that_is_not_the_tools_result_is_refused_before_the_work(tmp_path, tool, args, key, what):
    """plan_memory json=notes.txt moved the user's notes aside as an earlier plan and wrote the plan under their
    name (gpu_check and benchmark out= too; signal_propagation and window_transfer a file of their names in out_dir);
    benchmark_data alone refused it. Every measuring tool now refuses it, in one line, before the work."""
    module = importlib.import_module(tool)
    if key == "out_dir":  # a file of the tool's name there
        notes = tmp_path / f"{tool.rsplit('.', 1)[1]}.csv"
        given, message = tmp_path, f"{key}={tmp_path}: {notes} exists and is not a result of this {what}; " \
                                   f"give another {key}= (a new folder)"
    else:
        notes = given = tmp_path / "notes.txt"
        message = f"{key}={notes}: the file exists and is not a result of this {what}; give another {key}= (a new name)"
    notes.write_text("my notes")
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        module.main([*args, f"{key}={given}"])
    assert notes.read_text() == "my notes" and os.listdir(tmp_path) == [notes.name]
