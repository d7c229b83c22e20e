"""`adatoken eval --model hf`: a local Hugging Face checkpoint (a tiny random LLaVA-1.5 saved with its processor,
built offline here) answering an image-question JSONL, pruned by every method the sweep asks for."""
import json

import pytest

from adatoken.cli import main
from tiny_models import question_file, tiny_llava_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava")
    tiny_llava_checkpoint(folder)
    return folder


def test_eval_runs_a_local_checkpoint_with_pruning(checkpoint, tmp_path, capsys):
    data = question_file(tmp_path)
    args = ["eval", "--model", "hf", "--checkpoint", str(checkpoint), "--dataset", "jsonl", "--data", str(data),
            "--methods", "none", "fastv", "adatoken3d", "--retentions", "0.5", "--batch-size", "4",
            "--max-new-tokens", "3", "--out", str(tmp_path / "eval"), "--no-progress"]
    assert main(args) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    rows = {row["key"]: row for row in report["rows"]}
    assert rows["none"]["measured_retention"] == 1.0
    assert rows["fastv@0.5"]["measured_retention"] == pytest.approx(0.5, abs=0.05)
    assert rows["adatoken3d@0.5"]["flops_ratio"] < 1.0
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions" / "rank0.jsonl").open()]
    assert len(predictions) == 18 and all(p["spatial_in"][0] == 16 for p in predictions)  # 16 image tokens each


def test_bad_input_names_the_file(checkpoint, tmp_path, capsys):
    data = question_file(tmp_path, count=2)
    (tmp_path / "img1.png").write_text("not an image")
    base = ["eval", "--model", "hf", "--dataset", "jsonl", "--data", str(data), "--methods", "none",
            "--out", str(tmp_path / "eval"), "--no-progress"]
    assert main(base + ["--checkpoint", str(checkpoint)]) == 2
    assert f"cannot read image {tmp_path / 'img1.png'}" in capsys.readouterr().err
    (tmp_path / "img1.png").unlink()
    assert main(base + ["--checkpoint", str(checkpoint), "--fresh"]) == 2
    assert "image file not found" in capsys.readouterr().err
    assert main(base + ["--checkpoint", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(base[:3] + ["--dataset", "testbed", "--methods", "none"]) == 2
    assert "--model hf answers image questions" in capsys.readouterr().err
