"""`adatoken demo` end to end on a tiny testbed checkpoint: the report folder, skip reasons, and stage reuse."""
import json
import shutil

import pytest
import torch

from adatoken.apps.demo import stages
from adatoken.cli import main
from adatoken.core import models
from adatoken.eval.runner import default_methods
from adatoken.testbed import data as testbed_data
from adatoken.testbed import model as testbed_model
from adatoken.testbed.spatial import SpatialConfig

# A 24-layer testbed (the shipped one has 6): 0.4 is in reach of every method, and 0.05 is below what
# layers 0-1 keeping everything allow (2/24), so FastV, PyramidDrop, random and the AdaToken-3D fit must
# each say why they cannot run it.
RETENTIONS = ["0.05", "0.4"]
FIGURES = ["group_attention.png", "information_flow.png", "redundancy.png", "accuracy_vs_flops.png",
           "retention_per_layer.png", "speedup_vs_flops.png"]
STAGES = ["flow", "fit", "questions", "eval", "questions grounding", "eval grounding", "questions captioning",
          "eval captioning", "bench testbed", "bench llava3d-mini", "figures"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("testbed") / "checkpoint"
    tiny = testbed_model.ModelConfig(hidden_size=32, num_layers=24, num_heads=2, intermediate_size=64,
                                     position_hidden=16)
    testbed_model.TestbedModel.create(tiny, SpatialConfig(num_views=2, patch_grid=4, max_tokens=48)).save(path)
    return path


@pytest.fixture(autouse=True)
def small_demo(monkeypatch):
    """A 10-scene test split to draw the subset from, and a tiny model in place of the LLaVA-3D-proportioned one."""
    monkeypatch.setitem(testbed_data.SPLITS, "test", (testbed_data.SPLITS["test"][0], 10))
    monkeypatch.setitem(models.SHAPES, "demo-test", models.Shape("llama", dict(
        num_hidden_layers=8, hidden_size=32, intermediate_size=64, num_attention_heads=2, vocab_size=128,
        max_position_embeddings=4096), "the demo test's stand-in for llava3d-mini"))
    monkeypatch.setattr(stages, "BENCH_SHAPE", "demo-test")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()  # the demo sets its --threads for the process: give the suite its own back
    yield
    torch.set_num_threads(threads)


def run_demo(checkpoint, out, *extra) -> dict:
    assert main(["demo", "--checkpoint", str(checkpoint), "--out", str(out), "--questions", "6",
                 "--calib-questions", "2", "--task-questions", "4", "--retentions", *RETENTIONS, "--batch-size", "3",
                 "--bench-spatial", "32", "--bench-repeats", "1", "--no-progress", *extra]) == 0
    return json.loads((out / "report.json").read_text())


def reused(report: dict) -> dict[str, bool]:
    return {stage: report["stages"][stage]["reused"] for stage in STAGES}


@pytest.mark.slow
def test_demo_writes_the_report_and_reuses_its_stages(checkpoint, tmp_path, capsys):
    out = tmp_path / "report"
    first = run_demo(checkpoint, out)
    assert not any(reused(first).values())
    assert all((out / name).is_file() for name in ["report.md", "report.json", "flow.json", *FIGURES])
    assert sorted(p.name for p in (out / "schedules").glob("schedule-*.json")) == ["schedule-0.4.json"]

    rows = {row["key"]: row for row in first["eval"]["rows"]}
    methods = [m for m in default_methods() if m != "none"]  # every registered method
    assert set(rows) == {"none"} | {f"{m}@{r}" for m in methods for r in RETENTIONS}
    for key, row in rows.items():  # every config either ran (EM with its interval) or says why not
        assert (row["em"] is None) == (row["skipped"] is not None), key
        if row["em"] is not None:
            low, high = row["em"]["ci95"]
            assert row["em"]["n"] == 6 and low <= row["em"]["value"] <= high
    assert all(rows[f"{m}@0.05"]["skipped"] for m in ("fastv", "pdrop", "random", "adatoken3d"))
    assert "no schedule could be fitted" in rows["adatoken3d@0.05"]["skipped"]
    assert rows["adatoken3d@0.4"]["em"] is not None
    kept = first["eval"]["kept_per_layer"]["0.4"]["adatoken3d"]  # measured, and it follows the fitted schedule
    assert kept == pytest.approx(first["schedules"]["0.4"]["keep"], abs=0.05)
    markdown = (out / "report.md").read_text()
    assert all(f"]({name})" in markdown for name in FIGURES)
    assert "no schedule could be fitted" in markdown and first["reading"]
    assert set(first["bench"]) == {"testbed (24 layers)", "LLaVA-3D-proportioned (8 layers, hidden 32)"}
    # Table I: the same configs on the grounding and captioning sets, scored by box IoU and CIDEr
    grounding = {row["key"]: row for row in first["tasks"]["grounding"]["rows"]}
    captioning = {row["key"]: row for row in first["tasks"]["captioning"]["rows"]}
    assert set(grounding) == set(captioning) == set(rows)
    assert grounding["none"]["grounding"]["acc@0.5"]["n"] == 4 and grounding["fastv@0.05"]["skipped"]
    assert captioning["adatoken3d@0.4"]["captioning"]["cider@0.5"]["n"] == 4
    assert "## Table I" in markdown and "### 3D grounding (n=4)" in markdown and "### Dense captioning" in markdown
    printed = capsys.readouterr().out
    assert "EM % [95 % Wilson]" in printed and "skipped: " in printed

    flow_written = (out / "flow.json").stat().st_mtime_ns
    second = run_demo(checkpoint, out)
    assert all(reused(second).values()) and second["eval"]["rows"] == first["eval"]["rows"]
    assert (out / "flow.json").stat().st_mtime_ns == flow_written
    assert "[flow] reused" in capsys.readouterr().out

    # a setting the flow depends on: flow, fit and the adatoken3d predictions are computed again
    changed = run_demo(checkpoint, out, "--calib-questions", "3")
    assert reused(changed) == {"flow": False, "fit": False, "questions": True, "eval": False,
                               "questions grounding": True, "eval grounding": False, "questions captioning": True,
                               "eval captioning": False, "bench testbed": False, "bench llava3d-mini": True,
                               "figures": False}
    assert changed["flow"]["num_samples"] == 3

    fresh = run_demo(checkpoint, out, "--fresh", "--skip-bench", "--task-questions", "0")
    assert not any(fresh["stages"][stage]["reused"] for stage in ("flow", "fit", "questions", "eval", "figures"))
    assert fresh["bench"] == {} and "--skip-bench" in (out / "report.md").read_text()
    assert fresh["tasks"] == {} and "Table I: not run (--task-questions 0)" in (out / "report.md").read_text()


def test_table_one_says_why_a_checkpoint_never_trained_on_the_tasks_has_none(checkpoint, tmp_path, capsys):
    qa_only = tmp_path / "qa-only"
    shutil.copytree(checkpoint, qa_only)
    tokenizer = json.loads((qa_only / "tokenizer.json").read_text())
    del tokenizer["model"]["vocab"]["clicked"]
    (qa_only / "tokenizer.json").write_text(json.dumps(tokenizer))
    demo = stages.Demo(stages.DemoOptions(checkpoint=str(qa_only), out=str(tmp_path / "out")))
    tasks, note = demo.table_one([])
    assert tasks == {} and "never trained on 3D grounding and dense captioning" in note
    assert "--finetune-from" in note and note in capsys.readouterr().out


@pytest.mark.parametrize("option, value, message", [
    ("--questions", "0", "--questions must be at least 1"),
    ("--retentions", "1.5", "--retentions must lie in (0, 1]"),
    ("--threads", "0", "--threads must be at least 1"),
])
def test_bad_values_fail_with_one_line(checkpoint, tmp_path, capsys, option, value, message):
    assert main(["demo", "--checkpoint", str(checkpoint), "--out", str(tmp_path), option, value]) == 2
    assert message in capsys.readouterr().err


def test_a_missing_checkpoint_is_named(tmp_path, capsys):
    assert main(["demo", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert "no testbed checkpoint in" in capsys.readouterr().err


def test_the_reading_follows_the_numbers():
    from adatoken.apps.demo.report import read_accuracy
    from adatoken.eval.report import Accuracy, ReportRow

    def row(method, retention, hits, n=200):
        em = Accuracy.of([True] * hits + [False] * (n - hits))
        return ReportRow(f"{method}@{retention}", method, retention, em=em, flops_ratio=retention)

    lines = read_accuracy([row("none", None, 160), row("fastv", 0.4, 110), row("adatoken3d", 0.4, 150),
                           row("fastv", 0.1, 90), row("adatoken3d", 0.1, 95), row("random", 0.1, 95)])
    assert lines[0].startswith("Unpruned, the model answers 80.0 %")
    at_01, at_04 = lines[1], lines[2]  # retentions in increasing order
    assert "adatoken3d keeps accuracy best, 75.0 %" in at_04 and "beyond the 95 % intervals" in at_04
    assert "5.0 points below the unpruned model, within the intervals" in at_04
    assert "adatoken3d, random tie at 47.5 %" in at_01 and "next is fastv" in at_01 and "within the 95 %" in at_01
    assert "below the unpruned model, beyond the intervals" in at_01


def test_table_one_is_read_beside_question_answering():
    from adatoken.apps.demo.report import read_table_one
    from adatoken.eval.report import Accuracy, ReportRow

    def row(method, retention, em_hits, acc_hits, n=100):
        hits = [True] * acc_hits + [False] * (n - acc_hits)
        return ReportRow(f"{method}@{retention}" if retention else method, method, retention,
                         em=Accuracy.of([True] * em_hits + [False] * (n - em_hits)),
                         grounding={"acc@0.5": Accuracy.of(hits)})

    qa = [row("none", None, 80, 0), row("fastv", 0.4, 72, 0), row("dart", 0.4, 76, 0)]
    grounding = [row("none", None, 0, 50), row("fastv", 0.4, 0, 25), row("dart", 0.4, 0, 40)]
    (line,) = read_table_one({"grounding": grounding}, qa)
    assert line.startswith("Table I, 3D grounding Acc@0.5: unpruned 50.0 [")
    assert "at retention 0.4 dart scores best, 40.0 [" in line
    assert "fastv keeps 50% of it (of QA EM: 90%)" in line
    nothing = [row("none", None, 0, 0), row("fastv", 0.4, 0, 0)]
    assert "nothing to lose" in read_table_one({"grounding": nothing}, qa)[0]
