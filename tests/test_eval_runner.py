"""`adatoken eval`: the resumable, sharded sweep and its reports, on a tiny untrained testbed model.

The model is built with the testbed's own constructor and saved to a temporary checkpoint (nothing
is downloaded, no trained weights needed); its answers are nonsense, which is fine: these tests are
about what the runner keeps, loses, repeats and reports, not about accuracy.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adatoken.cli import main
from adatoken.core.schedule import curve_schedule
from adatoken.eval.datasets import QARecord, load_dataset
from adatoken.eval.report import wilson_interval
from adatoken.eval.runner import cut_torn_tail, load_schedules, read_log, select_subset, sweep_configs
from adatoken.testbed import model as testbed_model
from adatoken.testbed.data import load_split
from adatoken.testbed.spatial import SpatialConfig

TORCHRUN = Path(sys.executable).with_name("torchrun")
# 6 layers: every method reaches retention 0.4, none reaches 0.2 (layers 0-1 keep everything) -> skipped rows.
KEYS_RUN = ["none", "pdrop@0.4", "fastv@0.4"]
KEYS_SKIPPED = ["pdrop@0.2", "fastv@0.2"]
TINY_SPATIAL = SpatialConfig(num_views=2, patch_grid=4, max_tokens=48)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("testbed") / "checkpoint"
    tiny = testbed_model.ModelConfig(hidden_size=32, num_layers=6, num_heads=2, intermediate_size=64,
                                     position_hidden=16)
    testbed_model.TestbedModel.create(tiny, TINY_SPATIAL).save(path)
    return path


def eval_args(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--checkpoint", str(checkpoint), "--scenes", "6", "--limit", "20",
            "--methods", "none", "pdrop", "fastv", "--retentions", "0.4", "0.2",
            "--batch-size", "2", "--max-new-tokens", "3", "--out", str(out), "--no-progress", *extra]


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def reference(checkpoint, tmp_path_factory) -> Path:
    """An uninterrupted single-process run: what every other run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    assert main(eval_args(checkpoint, out)) == 0
    return out


def raw_lines(out: Path) -> list[dict]:
    """Every line of every prediction file, each of which must be complete JSON."""
    lines = []
    for path in sorted((out / "predictions").glob("rank*.jsonl")):
        text = path.read_text()
        assert text.endswith("\n"), f"{path} ends with a torn line"
        lines += [json.loads(line) for line in text.splitlines()]
    return lines


def predictions(out: Path) -> dict[tuple[str, str], str]:
    return {(row["config"], row["question_id"]): row["prediction"] for row in raw_lines(out)}


def scores(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())["configs"]


def assert_same_as_reference(out: Path, reference: Path) -> None:
    keys = [(row["config"], row["question_id"]) for row in raw_lines(out)]
    assert len(keys) == len(set(keys)), "a prediction was written twice"
    assert predictions(out) == predictions(reference)  # nothing lost, nothing different
    assert scores(out) == scores(reference)


def test_report_lists_every_config(reference):
    markdown = (reference / "report.md").read_text()
    rows = json.loads((reference / "report.json").read_text())["rows"]
    assert [r["key"] for r in rows] == ["none", "pdrop@0.4", "pdrop@0.2", "fastv@0.4", "fastv@0.2"]
    for row in rows:
        retention = "1" if row["retention"] is None else f"{row['retention']:g}"
        assert f"| {row['method']} | {retention} |" in markdown
        if row["key"] in KEYS_SKIPPED:
            assert "cannot reach retention 0.2" in row["skipped"]
            assert f"{row['key']}: {row['skipped']}" in markdown
        else:
            assert row["em"]["n"] == 20 and len(row["em"]["ci95"]) == 2
            assert row["prefill_flops"] > 0 and row["prefill_ms"] > 0
    assert json.loads((reference / "report.json").read_text())["context"]["command"].startswith("adatoken eval ")
    assert rows[0]["flops_ratio"] == 1.0 and rows[1]["flops_ratio"] < 0.8
    assert abs(rows[1]["measured_retention"] - 0.4) < 0.05
    assert set(scores(reference)) == set(KEYS_RUN)
    assert "## EM by question type" in markdown
    assert (reference / "accuracy_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = raw_lines(reference)
    assert len(lines) == 20 * len(KEYS_RUN)
    assert {"spatial_in", "prefill_flops", "batch_prefill_s", "references", "qtype"} <= set(lines[0])
    assert len(lines[0]["spatial_in"]) == 6


def test_resume_after_a_torn_write(reference, checkpoint, tmp_path):
    """A kill during a write leaves part of a line: the re-run drops it and redoes exactly what is missing."""
    (tmp_path / "predictions").mkdir()
    shutil.copy(reference / "run.json", tmp_path)
    kept = (reference / "predictions" / "rank0.jsonl").read_text().splitlines(keepends=True)
    torn = "".join(kept[:23]) + kept[23][: len(kept[23]) // 2]  # mid-batch, mid-line
    (tmp_path / "predictions" / "rank0.jsonl").write_text(torn)
    rerun_equals_reference(checkpoint, tmp_path, reference)


def kill_midway(cli_args: list[str], out: Path, lines: int) -> None:
    """Run `adatoken <cli_args>` in a subprocess and kill -9 it once OUT's prediction log holds `lines` lines."""
    process = subprocess.Popen([sys.executable, "-m", "adatoken.cli", *cli_args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    log = out / "predictions" / "rank0.jsonl"
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if log.exists() and log.read_bytes().count(b"\n") >= lines:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert process.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "metrics.json").exists()


@pytest.mark.slow
def test_resume_after_sigkill(reference, checkpoint, tmp_path):
    """kill -9 midway through the sweep, then the same command again: the result is the uninterrupted one."""
    kill_midway(eval_args(checkpoint, tmp_path), tmp_path, lines=25)  # in the second config
    rerun_equals_reference(checkpoint, tmp_path, reference)


@pytest.mark.slow
def test_two_processes_equal_one(reference, checkpoint, tmp_path):
    """torchrun with 2 CPU processes (gloo): disjoint shards, one file each, the single-process predictions."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "adatoken.cli",
               *eval_args(checkpoint, tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    shards = [{row["question_id"] for row in read_log(tmp_path / "predictions" / f"rank{r}.jsonl")} for r in (0, 1)]
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    assert_same_as_reference(tmp_path, reference)
    assert "x 2 process" in json.loads((tmp_path / "report.json").read_text())["context"]["device"]


def test_rerun_with_other_settings_is_refused(reference, checkpoint, tmp_path, capsys):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    changed = eval_args(checkpoint, tmp_path)
    changed[changed.index("--max-new-tokens") + 1] = "2"
    assert main(changed) == 2  # the CLI turns the ValueError into a one-line error
    assert re.search("max_new_tokens differ.*--fresh", capsys.readouterr().err)
    assert predictions(tmp_path) == predictions(reference)  # refused before touching anything
    fewer = eval_args(checkpoint, tmp_path)
    fewer[fewer.index("--methods") + 1: fewer.index("--retentions")] = ["none"]
    assert main(fewer + ["--fresh"]) == 0  # --fresh starts over
    assert {key for key, _ in predictions(tmp_path)} == {"none"}
    assert not (tmp_path / "predictions" / "rank0.jsonl").read_text().count("pdrop")


def test_testbed_loader_returns_qarecords(checkpoint):
    records = load_dataset("testbed", checkpoint, split="test", num_scenes=2)
    samples = load_split("test", num_scenes=2, cfg=TINY_SPATIAL)
    assert records and all(isinstance(r, QARecord) for r in records)
    assert [r.question_id for r in records] == [s.question_id for s in samples]
    assert len({r.question_id for r in records}) == len(records)
    for record, sample in zip(records, samples):
        assert record.answers == list(sample.answers) and record.qtype == sample.qtype
        assert record.extra == {"scene_seed": sample.scene_seed, "split": "test"}
    with pytest.raises(FileNotFoundError, match="testbed.json"):
        load_dataset("testbed", checkpoint / "missing")


def test_sweep_configs_skip_infeasible_and_match_schedules(tmp_path):
    configs = sweep_configs(["none", "fastv", "adatoken3d"], [0.1, 0.4], num_layers=8)
    assert [c.key for c in configs] == ["none", "fastv@0.1", "fastv@0.4", "adatoken3d@0.1", "adatoken3d@0.4"]
    assert [c.key for c in configs if c.skipped] == ["fastv@0.1", "adatoken3d@0.1"]
    assert "lowest it reaches is 0.2500" in configs[1].skipped

    curve_schedule(8, 0.4).save(tmp_path / "fit-0.4.json")
    schedules = load_schedules([tmp_path])
    assert list(schedules) == [0.4]
    fitted = sweep_configs(["adatoken3d"], [0.3, 0.4], num_layers=8, schedules=schedules)
    assert "no fitted schedule for retention 0.3 (schedules given for: 0.4)" == fitted[0].skipped
    assert fitted[1].skipped is None and fitted[1].prune.params.schedule.keep == schedules[0.4].keep
    with pytest.raises(ValueError, match="valid: adatoken3d, coverage, dart, divprune, fastv"):
        sweep_configs(["fastvv"], [0.4], num_layers=8)


def test_prediction_log_drops_a_torn_tail_and_refuses_damage(tmp_path):
    path = tmp_path / "rank0.jsonl"
    path.write_text('{"config": "none", "question_id": "a"}\n{"config": "none", "quest')
    assert [row["question_id"] for row in read_log(path)] == ["a"]
    cut_torn_tail(path)
    assert path.read_text() == '{"config": "none", "question_id": "a"}\n'
    path.write_text('{"config": "none", "question_id": "a"}\n{"conf\n{"config": "none", "question_id": "b"}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_log(path)


def test_limit_is_a_fixed_nested_subset():
    records = [QARecord(str(i), None, "q", ["a"]) for i in range(50)]
    ten, twenty = select_subset(records, 10, seed=0), select_subset(records, 20, seed=0)
    assert ten == select_subset(records, 10, seed=0) and set(map(id, ten)) < set(map(id, twenty))
    assert [r.question_id for r in ten] == sorted((r.question_id for r in ten), key=int)  # dataset order
    assert select_subset(records, 10, seed=1) != ten


def test_wilson_interval():
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    assert wilson_interval(0, 20) == (0.0, pytest.approx(0.1611, abs=1e-4))


def rerun_equals_reference(checkpoint, out, reference) -> None:
    """The same command again, in the folder an interrupted run left: it ends as the uninterrupted run did."""
    assert main(eval_args(checkpoint, out)) == 0
    assert_same_as_reference(out, reference)
