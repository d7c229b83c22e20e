"""`adatoken eval --model llava3d` on the stand-in, through a miniature of LLaVA-3D's package (llava_package/):
its question files, its prompts and sampling, pruning found in its own input preparation, resume, and the
errors a user meets first."""
from __future__ import annotations

import inspect
import json
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from adatoken.cli import main
from adatoken.eval import metrics
from llava3d_models import LOC_TOKEN_INDEX, PLACEHOLDER, LlavaLlama3D, write_llava3d_workspace

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


class _WordOverlap:
    """Stands in for pycocoevalcap's scorers: .venv-legacy leaves the `eval` extra out on purpose
    (test_lower_bounds.py), and their numbers are tested in tests/; here what counts is that the captions reach
    Scan2Cap's table. A caption's score: the share of its words found in its references."""

    def __init__(self, n: int = 1):
        self.n = n

    def compute_score(self, gts, res, verbose=0):
        each = [len(set(res[i][0].split()) & {w for r in gts[i] for w in r.split()}) / len(res[i][0].split())
                for i in sorted(res)]
        mean = sum(each) / len(each)
        return ([mean] * self.n, [each] * self.n) if self.n > 1 else (mean, each)


_WORD_OVERLAP_SCORERS = SimpleNamespace(Bleu=_WordOverlap, Cider=_WordOverlap, Meteor=_WordOverlap,
                                        Rouge=_WordOverlap, PTBTokenizer=None)


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


def _bf16(point) -> tuple:
    """A click as the model receives it: LLaVA-3D's scripts cast clicks to bfloat16 (model_scan2cap.py:92)."""
    return tuple(torch.tensor(point).bfloat16().tolist())


def _caption(root: Path, checkpoint: Path, out: str, *extra: str) -> int:
    """Two of the workspace's Scan2Cap objects (a seeded --limit), captioned greedily."""
    return main(["eval", "--model", "llava3d", "--checkpoint", str(checkpoint), "--dataset", "llava3d-scan2cap",
                 "--data", str(root / "scan2cap.json"), "--video-folder", str(root / "videos"), "--limit", "2",
                 "--greedy", "--max-new-tokens", "3", "--device", "cpu", "--out", str(root / out), "--no-progress",
                 *extra])


def test_eval_captions_llava3d_scan2cap_objects_given_as_clicks(workspace, monkeypatch):
    """--dataset llava3d-scan2cap as LLaVA-3D's model_scan2cap.py runs it: its prompt with the box as a <boxes> click
    at the box's centre rounded to 3 decimals; every method pruned with no mask; Scan2Cap's scores reported."""
    root, checkpoint = workspace
    monkeypatch.syspath_prepend(str(PACKAGE))
    received, prepare = [], LlavaLlama3D.prepare_inputs_labels_for_multimodal

    def recording(self, *args, **kwargs):  # what reaches the model's own input preparation
        given = inspect.signature(prepare).bind(self, *args, **kwargs).arguments
        if given["images"] is not None and given["input_ids"].shape[1] > 1:
            received.append((given["input_ids"].clone(), given.get("clicks")))
        return prepare(self, *args, **kwargs)

    monkeypatch.setattr(LlavaLlama3D, "prepare_inputs_labels_for_multimodal", recording)
    monkeypatch.setattr(metrics, "require_pycocoevalcap", lambda: _WORD_OVERLAP_SCORERS)
    assert _caption(root, checkpoint, "captions", "--methods", "none", "fastv", "adatoken3d",
                    "--retentions", "0.4") == 0
    rows = _predictions(root / "captions")
    assert len(rows) == 3 * 2 and {row["qtype"] for row in rows.values()} == {"captioning"}

    # The prompt: <video> became the scene's placeholder, the box one click placeholder after it, no text lost
    # (the word-level tokenizer maps an unknown word, such as a <video> left as text, to id 0).
    boxes = {r["id"]: r["target"]["boxes"][0] for r in json.loads((root / "scan2cap.json").read_text())}
    captioned = {question_id for _, question_id in rows}
    assert len(received) == 3 * 2
    for input_ids, clicks in received:
        ids = input_ids[0].tolist()
        assert ids.count(PLACEHOLDER) == 1 and ids.count(LOC_TOKEN_INDEX) == 1 and 0 not in ids
        assert ids.index(PLACEHOLDER) < ids.index(LOC_TOKEN_INDEX)
        assert clicks.shape == (1, 3) and clicks.dtype == torch.bfloat16  # cast like the scene, as the script does
    # each object's click, once per method: its box's centre rounded to 3 decimals
    as_given = Counter(tuple(clicks[0].tolist()) for _, clicks in received)
    assert as_given == Counter({_bf16([round(c, 3) for c in boxes[q][:3]]): 3 for q in captioned})
    assert not {_bf16(boxes[q][:3]) for q in captioned} & set(as_given)  # rounded, not the raw centre

    report = json.loads((root / "captions" / "report.json").read_text())
    text = (root / "captions" / "report.md").read_text()
    assert "## Dense captioning (n=2)" in text and "| cider@0.25 | cider@0.5 | bleu_4@0.25 |" in text
    for row in report["rows"]:
        assert "cider@0.5" in row["captioning"] and "bleu_4@0.25" in row["captioning"]
        assert row["measured_retention"] == 1 if row["method"] == "none" else row["measured_retention"] < 1
    for (config, _), row in rows.items():
        spatial = row["spatial_in"]  # found with no mask given: LLaVA-3D's own input preparation
        assert spatial[0] > 0 and (spatial[-1] < spatial[0]) == (config != "none")

    # A batch's clicks are one [num_clicks, 3] tensor in the order of its <boxes>, as LLaVA-3D's collator builds
    # them: two objects in one call caption as one a call does (greedy: sampled draws differ by batch).
    received.clear()
    assert _caption(root, checkpoint, "captions2", "--methods", "none", "--batch-size", "2") == 0
    (_, clicks), = received
    assert sorted(map(tuple, clicks.tolist())) == sorted(as_given)
    assert {k: r["prediction"] for k, r in _predictions(root / "captions2").items()} == \
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
    # ScanRefer grounding: LLaVA-3D's release has no grounding output to score; say so and what runs
    assert main(["eval", "--model", "llava3d", "--checkpoint", str(checkpoint), "--dataset", "scanrefer",
                 "--data", str(bad), "--out", str(root / "err5")]) == 2
    err = capsys.readouterr().err
    assert "no grounding output and no grounding evaluation script" in err and "llava3d-scan2cap" in err
    # a Scan2Cap prompt without its box placeholder would caption no object in particular
    captions = json.loads((root / "scan2cap.json").read_text())[:1]
    captions[0]["conversations"][0]["value"] = "<video>\nDescribe the object in detail."
    (root / "no_box.json").write_text(json.dumps(captions))
    monkeypatch.setattr(metrics, "require_pycocoevalcap", lambda: _WORD_OVERLAP_SCORERS)
    code = main(["eval", "--model", "llava3d", "--checkpoint", str(checkpoint), "--dataset", "llava3d-scan2cap",
                 "--data", str(root / "no_box.json"), "--video-folder", str(root / "videos"), "--methods", "none",
                 "--device", "cpu", "--out", str(root / "err6"), "--no-progress"])
    assert code == 2 and "one <boxes>" in capsys.readouterr().err


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
