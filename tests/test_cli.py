"""The `adatoken` command: how it starts, its reference page, the calibration commands (analyze → fit → sweep)
end to end and where they take models and samples from, and argument checks. `adatoken bench`, `demo` and
`eval` have their own end-to-end files (test_bench.py, test_demo.py, test_eval_runner.py)."""
import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from adatoken.cli import build_parser, main
from adatoken.cli.calibrate import load_source
from adatoken.cli.doc import render
from adatoken.core.schedule import Schedule
from tiny_models import build_model

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COMMANDS = ["demo", "bench", "analyze", "fit", "sweep", "eval", "testbed"]


def _is_png(path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_SIGNATURE


def test_python_m_adatoken_runs_the_command(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps help to the terminal: the same width here and there
    result = subprocess.run([sys.executable, "-m", "adatoken", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == build_parser().format_help()
    assert all(re.search(rf"^ +{command} ", result.stdout, re.M) for command in COMMANDS), result.stdout


def test_cli_reference_matches_the_parser():
    assert DOC.read_text() == render(), "docs/cli.md is stale: run `python -m adatoken.cli.doc > docs/cli.md`"


def test_cli_analyze_fit_sweep(tmp_path, capsys):
    small = ["--num-samples", "1", "--spatial-tokens", "24", "--device", "cpu", "--quiet", "--out", str(tmp_path)]
    assert main(["analyze", "--model", "tiny-qwen2", "--chunk-size", "10", *small]) == 0
    flow = json.loads((tmp_path / "flow.json").read_text())
    assert flow["num_layers"] == 12 and flow["num_samples"] == 1
    assert all(_is_png(tmp_path / name) for name in ("group_attention.png", "information_flow.png", "redundancy.png"))

    assert main(["fit", str(tmp_path / "flow.json"), "--retention", "0.4"]) == 0
    schedule = Schedule.load(tmp_path / "schedule.json")
    assert schedule.retention == pytest.approx(0.4) and _is_png(tmp_path / "schedule.png")

    assert main(["sweep", "--model", "tiny-llama", "--layers", "3", "--drop-ratios", "0", "0.5", *small]) == 0
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert result["layers"] == [3] and len(result["metric"][0]) == 2 and _is_png(tmp_path / "sweep.png")
    assert "redundancy" in capsys.readouterr().out


def test_fit_names_a_file_that_is_not_a_flow_report(tmp_path, capsys):
    Schedule([1.0, 0.5]).save(tmp_path / "schedule.json")
    assert main(["fit", str(tmp_path / "schedule.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adatoken fit: error: ") and str(tmp_path / "schedule.json") in err
    assert "expected a JSON object with format 'adatoken.flow/v1'" in err
    assert main(["fit", str(tmp_path / "missing.json")]) == 2
    assert f"not found: {tmp_path / 'missing.json'}" in capsys.readouterr().err


def test_testbed_source_puts_the_answer_after_the_last_instruction_token():
    from adatoken.testbed.tokenizer import build_tokenizer

    # `adatoken analyze`'s default source: the shipped testbed checkpoint on its calib split
    args = argparse.Namespace(model="testbed", model_path=None, num_samples=2, device="cpu", dtype="float32")
    source = load_source(args)
    assert source.model.config.model_type == "llama" and len(source.samples) == 2
    table = source.model.get_input_embeddings().weight
    token_at = lambda embeds, i: int((table - embeds[i]).abs().sum(1).argmin())  # noqa: E731
    colon, eos = build_tokenizer().convert_tokens_to_ids([":", "</s>"])
    for sample in source.samples:
        embeds = sample.inputs["inputs_embeds"][0]
        assert int(sample.spatial_mask[0].nonzero().max()) < sample.query_index < embeds.shape[0] - 1
        assert token_at(embeds, sample.query_index) == colon  # "ASSISTANT:" ends the instruction
        assert token_at(embeds, -1) == eos                   # the answer, then </s>


def test_model_path_loads_a_local_checkpoint(tmp_path):
    build_model("qwen2").save_pretrained(tmp_path / "checkpoint")
    args = argparse.Namespace(model="tiny-llama", model_path=tmp_path / "checkpoint", num_samples=1, spatial_tokens=8,
                              seed=0, device="cpu", dtype="float32", attn="sdpa")
    source = load_source(args)
    assert source.model.config.model_type == "qwen2" and source.model.config._attn_implementation == "sdpa"
    assert int(source.samples[0].spatial_mask.sum()) == 8
    with pytest.raises(ValueError, match="local checkpoint directory"):
        load_source(argparse.Namespace(**{**vars(args), "model_path": tmp_path / "missing"}))


def test_testbed_cli_refuses_non_positive_counts():
    with pytest.raises(SystemExit, match="--num-scenes must be a positive integer, got 0"):
        main(["testbed", "probe", "--num-scenes", "0"])
    with pytest.raises(SystemExit, match="--geometry-per-type must be a positive integer, got -1"):
        main(["testbed", "train", "--geometry-per-type", "-1"])
    with pytest.raises(SystemExit, match="--grounding must be >= 0, got -0.5"):
        main(["testbed", "train", "--grounding", "-0.5"])
    with pytest.raises(SystemExit, match="without --grounding-turns N"):  # it would train nothing it softens
        main(["testbed", "train", "--coordinate-sigma", "1.0"])
    with pytest.raises(SystemExit, match="only --grounding-turns N"):
        main(["testbed", "train", "--locator-layers", "2"])


def test_eval_refuses_options_its_dataset_would_ignore(capsys, tmp_path):
    """--answers and --images name files only some formats read: elsewhere they are refused, not ignored."""
    data = tmp_path / "q.jsonl"
    data.write_text("")
    for flags, expected in ((["--answers", "a.json"], "--answers applies to --dataset llava3d and vqav2 only"),
                            (["--images", "imgs"], "--images applies to --dataset vqav2 and textvqa only")):
        assert main(["eval", "--model", "hf", "--checkpoint", str(tmp_path), "--dataset", "jsonl", "--data", str(data),
                     *flags, "--out", str(tmp_path / "out")]) == 2
        assert expected in capsys.readouterr().err
