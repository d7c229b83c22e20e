"""`adatoken eval --model llava3d` on the stand-in, through a miniature of LLaVA-3D's package (llava_package/):
its question files, its prompts and sampling, pruning found in its own input preparation, resume, and the
errors a user meets first."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from adatoken.cli import main
from llava3d_models import write_llava3d_workspace

PACKAGE = Path(__file__).parent / "llava_package"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava3d_eval")
    return root, write_llava3d_workspace(root)


def _eval(root: Path, checkpoint: Path, out: str, *extra: str) -> int:
    return main(["eval", "--model", "llava3d", "--checkpoint", str(checkpoint), "--dataset", "llava3d",
                 "--data", str(root / "questions.json"), "--answers", str(root / "answers.json"),
                 "--video-folder", str(root / "videos"), "--max-new-tokens", "3", "--device", "cpu",
                 "--out", str(root / out), "--no-progress", *extra])


def _predictions(folder: Path) -> dict[tuple[str, str], dict]:
    rows = [json.loads(line) for path in sorted((folder / "predictions").glob("rank*.jsonl"))
            for line in path.read_text().splitlines()]
    return {(row["config"], row["question_id"]): row for row in rows}


def test_eval_runs_llava3d_through_its_package_and_prunes_in_its_own_input_preparation(workspace, monkeypatch):
    root, checkpoint = workspace
    monkeypatch.syspath_prepend(str(PACKAGE))
    assert _eval(root, checkpoint, "run", "--methods", "none", "fastv", "adatoken3d", "--retentions", "0.4") == 0
    rows = _predictions(root / "run")
    assert len(rows) == 3 * 4
    report = (root / "run" / "report.md").read_text()
    assert "sampled at temperature 0.2" in report and "batches of 1" in report  # LLaVA-3D's evaluation settings
    for (config, _), row in rows.items():
        spatial = row["spatial_in"]
        assert spatial[0] > 0  # the scene's tokens were found with no mask: LLaVA-3D's own preparation
        if config == "none":
            assert spatial[-1] == spatial[0]
        else:
            assert spatial[-1] < spatial[0]

    # The same command again resumes: nothing is answered twice and the answers stand.
    assert _eval(root, checkpoint, "run", "--methods", "none", "fastv", "adatoken3d", "--retentions", "0.4") == 0
    assert _predictions(root / "run") == rows

    # Sampling is seeded per question: a fresh run gives the same answers, and so does the unpruned model
    # called the way LLaVA-3D's script calls it.
    assert _eval(root, checkpoint, "again", "--methods", "none") == 0
    again = _predictions(root / "again")
    assert {k: r["prediction"] for k, r in again.items()} == \
        {k: r["prediction"] for k, r in rows.items() if k[0] == "none"}


def test_greedy_option_and_batches(workspace, monkeypatch):
    root, checkpoint = workspace
    monkeypatch.syspath_prepend(str(PACKAGE))
    assert _eval(root, checkpoint, "greedy1", "--methods", "none", "--greedy") == 0
    assert _eval(root, checkpoint, "greedy2", "--methods", "none", "--greedy", "--batch-size", "2") == 0
    one, two = _predictions(root / "greedy1"), _predictions(root / "greedy2")
    assert len({row["spatial_in"][0] for row in one.values()}) > 1  # the scenes differ in token count
    assert "greedy" in (root / "greedy1" / "report.md").read_text()
    # Left-padded batches of scenes with different token counts answer as single questions do.
    assert {k: r["prediction"] for k, r in one.items()} == {k: r["prediction"] for k, r in two.items()}


def test_clear_errors(workspace, monkeypatch, capsys):
    root, checkpoint = workspace
    # LLaVA-3D's package absent: say so and how to install it.
    for name in [name for name in sys.modules if name == "llava" or name.startswith("llava.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "llava", None)  # what Python does when no package named llava is installed
    assert _eval(root, checkpoint, "err", "--methods", "none") == 2
    assert "pip install -e LLaVA-3D" in capsys.readouterr().err
    monkeypatch.delitem(sys.modules, "llava")
    monkeypatch.syspath_prepend(str(PACKAGE))
    # a scene missing from the video folder names the path
    questions = json.loads((root / "questions.json").read_text())
    bad = root / "missing_scene.json"
    bad.write_text(json.dumps([{**questions[0], "video": "scannet/scene9999_00"}]))
    code = main(["eval", "--model", "llava3d", "--checkpoint", str(checkpoint), "--dataset", "llava3d",
                 "--data", str(bad), "--answers", str(root / "answers.json"), "--video-folder", str(root / "videos"),
                 "--methods", "none", "--device", "cpu", "--out", str(root / "err2"), "--no-progress"])
    assert code == 2 and "scene9999_00 not found" in capsys.readouterr().err
    # LLaVA-3D options on another model, and another dataset format on LLaVA-3D
    assert main(["eval", "--model", "testbed", "--greedy", "--out", str(root / "err3")]) == 2
    assert "--greedy apply to --model llava3d only" in capsys.readouterr().err
    assert main(["eval", "--model", "llava3d", "--checkpoint", str(checkpoint), "--dataset", "jsonl",
                 "--data", str(bad), "--out", str(root / "err4")]) == 2
    assert "--dataset scanqa, sqa3d or llava3d" in capsys.readouterr().err


def test_readme_llava3d_snippet(workspace, monkeypatch):
    """The README's LLaVA-3D block, run as written: calibration, pruning and generate on LLaVA-3D's own inputs."""
    root, checkpoint = workspace
    monkeypatch.syspath_prepend(str(PACKAGE))
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = [block.split("\n", 1)[1] for block in readme.split("```python")[1:]]
    (snippet,) = [block.split("```")[0] for block in blocks if "load_pretrained_model" in block]
    prompt = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the human's questions. USER: <image>\nwhat colour is the chair "
              "ASSISTANT:")
    names = {"checkpoint": str(checkpoint), "scene_folder": str(root / "videos" / "scannet" / "scene0001_00"),
             "prompt": prompt, "answer": " red </s>"}
    exec(compile(snippet, "README.md", "exec"), names)
    stats = names["adatoken"].last_stats(names["model"])
    assert stats.spatial_in[0][0] > 50 and stats.spatial_in[-1][0] < stats.spatial_in[0][0]
    assert names["out"].shape[0] == 1
