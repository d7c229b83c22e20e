"""`adatoken eval --model hf`: local Hugging Face checkpoints of every family it runs (tiny random models saved with
processors built offline, tests/tiny_models.py) answering an image-question JSONL, pruned by the sweep's methods;
resumed after a kill and sharded by torchrun as the runner promises; where answers end; its errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adatoken.cli import main
from adatoken.eval import hf
from adatoken.eval.datasets import load_dataset
from test_eval_runner import kill_midway
from tiny_models import CHECKPOINT_FAMILIES, build_model, question_file, tiny_checkpoint

TORCHRUN = Path(sys.executable).with_name("torchrun")
# image tokens the processor expands one 20 x 24 question image into (tiny_checkpoint's docstring derives them)
IMAGE_TOKENS = {"llava": 16, "llava_next": 36, "llava_onevision": 36, "qwen2_vl": 30, "qwen2_5_vl": 30}
QUESTIONS = ("what colour is the chair ?", "how many ?", "is the chair red or blue ?")  # three prompt lengths


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> its checkpoint folder, built on first use and shared by the tests of this file."""
    built = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = tmp_path_factory.mktemp(family)
            tiny_checkpoint(family, built[family])
        return built[family]
    return get


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def eval_args(checkpoint: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--model", "hf", "--checkpoint", str(checkpoint), "--dataset", "jsonl", "--data", str(data),
            "--methods", "none", "fastv", "adatoken3d", "--retentions", "0.5", "--max-new-tokens", "3",
            "--out", str(out), "--no-progress", *extra]


def prediction_rows(out: Path) -> list[dict]:
    return [json.loads(line) for path in sorted((out / "predictions").glob("rank*.jsonl"))
            for line in path.read_text().splitlines()]


def predictions(out: Path) -> dict[tuple[str, str], str]:
    return {(row["config"], row["question_id"]): row["prediction"] for row in prediction_rows(out)}


@pytest.mark.parametrize("family", CHECKPOINT_FAMILIES)
def test_eval_runs_every_family_with_pruning(family, checkpoints, tmp_path):
    """Each family end to end: every question answered under every method, the image tokens found as the spatial
    tokens (all of them, nothing else), pruned rows near the requested retention, a batch of unequal prompts."""
    data = question_file(tmp_path, count=4, questions=QUESTIONS)
    assert main(eval_args(checkpoints(family), data, tmp_path / "eval", "--batch-size", "4")) == 0
    rows = {row["key"]: row for row in json.loads((tmp_path / "eval" / "report.json").read_text())["rows"]}
    assert rows["none"]["measured_retention"] == 1.0
    for key in ("fastv@0.5", "adatoken3d@0.5"):
        assert rows[key]["measured_retention"] == pytest.approx(0.5, abs=0.05), key
        assert rows[key]["flops_ratio"] < 1.0
    lines = prediction_rows(tmp_path / "eval")
    assert sorted((row["config"], row["question_id"]) for row in lines) == \
        sorted((key, f"q{i}") for key in rows for i in range(4))
    assert all(isinstance(row["prediction"], str) for row in lines)
    # the image tokens the processor expanded are what entered layer 0 as spatial tokens
    model, processor, _ = hf.load_model_and_processor(checkpoints(family), torch.device("cpu"))
    inputs = hf.chat_inputs(processor, load_dataset("jsonl", str(data))[:1])
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == IMAGE_TOKENS[family]
    assert all(row["spatial_in"][0] == IMAGE_TOKENS[family] for row in lines)
    assert all(row["spatial_in"][-1] < IMAGE_TOKENS[family] for row in lines if row["config"] != "none")


@pytest.mark.parametrize("family, end", [("llava", None), ("llava_next", "</s>"), ("llava_onevision", "<|im_end|>"),
                                         ("qwen2_vl", "<|im_end|>"), ("qwen2_5_vl", "<|im_end|>")])
def test_answers_end_where_the_turn_ends(family, end, checkpoints):
    """An answer is cut at the first end-of-text or end-of-turn token, whatever follows; the end-of-turn string is
    what the family's chat template writes after an answer."""
    model, processor, _ = hf.load_model_and_processor(checkpoints(family), torch.device("cpu"))
    answerer = hf.HFAnswerer(model, processor, torch.device("cpu"))
    assert answerer.end_of_turn == end
    stops = processor.tokenizer.convert_ids_to_tokens(answerer.stop_ids)  # end of text (and of turn, for Qwen)
    assert processor.tokenizer.eos_token in stops and (end is None or end in stops)
    ids = processor.tokenizer.convert_tokens_to_ids
    rows = [ids(["red", stop, "blue", "chair"]) for stop in stops] + [ids(["red", "blue", "chair", "two"])]
    assert answerer.texts(torch.tensor(rows)) == ["red"] * len(stops) + ["red blue chair two"]


def test_an_end_of_turn_in_plain_text_cuts_the_answer(checkpoints):
    """A template whose turns end in plain words (as LLaVA's '###' separators do) ends answers there too: the words
    survive decoding, so the text is cut where they begin."""
    model, processor, _ = hf.load_model_and_processor(checkpoints("llava"), torch.device("cpu"))
    processor.chat_template = processor.chat_template.replace("{{ c['text'] }} ", "{{ c['text'] }} how many")
    answerer = hf.HFAnswerer(model, processor, torch.device("cpu"))
    assert answerer.end_of_turn == "how many"
    ids = processor.tokenizer.convert_tokens_to_ids
    rows = [ids(["red", "how", "many", "blue"]), ids(["red", "how", "blue", "two"])]
    assert answerer.texts(torch.tensor(rows)) == ["red", "red how blue two"]


def test_prompt_suffix_follows_every_question(checkpoints, tmp_path, monkeypatch, capsys):
    """--prompt-suffix reaches every prompt on a new line, is recorded with the run (a rerun with another suffix is
    refused instead of mixing prompts), and is refused for the other models."""
    asked, chat_inputs = [], hf.chat_inputs

    def recording(processor, records):
        asked.extend(r.question for r in records)
        return chat_inputs(processor, records)
    monkeypatch.setattr(hf, "chat_inputs", recording)
    data = question_file(tmp_path, count=2)
    args = eval_args(checkpoints("llava"), data, tmp_path / "eval", "--methods", "none")
    assert main(args + ["--prompt-suffix", "how many ?"]) == 0
    assert asked == ["what colour is the chair ?\nhow many ?"] * 2
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert "prompt suffix 'how many ?'" in report["context"]["decoding"]
    assert main(args + ["--prompt-suffix", "two ?"]) == 2
    assert "decoding" in capsys.readouterr().err  # the setting that differs
    assert main(args + ["--prompt-suffix", " "]) == 2
    assert "--prompt-suffix is empty" in capsys.readouterr().err
    assert main(["eval", "--prompt-suffix", "how many ?", "--out", str(tmp_path / "testbed")]) == 2
    assert "--prompt-suffix apply to --model hf only" in capsys.readouterr().err


# --- the runner's promises, kept for --model hf ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(checkpoints, tmp_path_factory):
    """An uninterrupted single-process LLaVA-1.5 run: what a resumed or sharded run must reproduce."""
    folder = tmp_path_factory.mktemp("hf-reference")
    data = question_file(folder, count=6, questions=QUESTIONS)
    assert main(eval_args(checkpoints("llava"), data, folder / "eval", "--batch-size", "2")) == 0
    return data, folder / "eval"


def assert_same_as_reference(out: Path, reference: Path) -> None:
    keys = [(row["config"], row["question_id"]) for row in prediction_rows(out)]
    assert len(keys) == len(set(keys)) == 18, "a prediction was lost or written twice"
    assert predictions(out) == predictions(reference)
    metrics = [json.loads((folder / "metrics.json").read_text())["configs"] for folder in (out, reference)]
    assert metrics[0] == metrics[1]


@pytest.mark.slow
def test_resume_after_sigkill(reference, checkpoints, tmp_path):
    """kill -9 midway through the sweep, then the same command again: the result is the uninterrupted one."""
    data, expected = reference
    out = expected.parent / "resumed"  # beside the reference: the same data path, so the same settings
    args = eval_args(checkpoints("llava"), data, out, "--batch-size", "2")
    kill_midway(args, out, lines=8)  # inside the second config
    assert 8 <= len(prediction_rows(out)) < 18
    assert main(args) == 0
    assert_same_as_reference(out, expected)


@pytest.mark.slow
def test_two_processes_equal_one(reference, checkpoints, tmp_path):
    """torchrun with 2 CPU processes (gloo): disjoint shards, one file each, the single-process predictions."""
    data, expected = reference
    out = expected.parent / "sharded"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "adatoken.cli",
               *eval_args(checkpoints("llava"), data, out, "--batch-size", "2")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    shards = [{row["question_id"] for row in map(json.loads, (out / "predictions" / f"rank{r}.jsonl").open())}
              for r in (0, 1)]
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    assert_same_as_reference(out, expected)
    assert "x 2 process" in json.loads((out / "report.json").read_text())["context"]["device"]


# --- errors that name what is wrong ----------------------------------------------------------------------------------
def test_bad_input_names_the_file(checkpoints, tmp_path, capsys):
    checkpoint = checkpoints("llava")
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


def test_a_folder_it_cannot_run_is_named_with_the_reason(tmp_path, capsys):
    """A model without its processor, a text-only model, an image-text-to-text family adatoken does not prune, and
    a model type transformers does not know: each refused before any weights load, naming the folder."""
    data = question_file(tmp_path, count=1)
    base = ["eval", "--model", "hf", "--dataset", "jsonl", "--data", str(data), "--methods", "none",
            "--out", str(tmp_path / "eval"), "--no-progress", "--checkpoint"]
    supported = "--model hf runs these model types: llava, llava_next, llava_onevision, qwen2_5_vl, qwen2_vl"
    build_model("llava").save_pretrained(tmp_path / "no-processor")
    assert main(base + [str(tmp_path / "no-processor")]) == 2
    err = capsys.readouterr().err
    assert f"--checkpoint {tmp_path / 'no-processor'}: no processor could be loaded" in err
    assert "processor.save_pretrained" in err
    build_model("llama").save_pretrained(tmp_path / "text-only")
    assert main(base + [str(tmp_path / "text-only")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'text-only'}: config.json describes model type 'llama' (LlamaForCausalLM)" in err
    assert "not an image-text-to-text model" in err and supported in err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    assert main(base + [str(tmp_path / "broken")]) == 2
    assert f"{tmp_path / 'broken'}: config.json is not valid JSON" in capsys.readouterr().err
    for model_type, why in [("mllama", "an image-text-to-text model adatoken does not prune"),
                            ("no_such_model", "not an image-text-to-text model this transformers can load")]:
        (tmp_path / model_type).mkdir()
        (tmp_path / model_type / "config.json").write_text(json.dumps({"model_type": model_type}))
        assert main(base + [str(tmp_path / model_type)]) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / model_type}: config.json describes model type {model_type!r}" in err
        assert why in err and supported in err
