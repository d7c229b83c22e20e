"""`adatoken analyze / sweep --model hf`: calibration of a local Hugging Face checkpoint (a tiny random LLaVA-1.5
saved with its processor, built offline) on real image questions through its own processor and chat template,
and the fitted schedule evaluated with `adatoken eval --model hf`."""
import json
import shutil

import pytest
import torch
from transformers import AutoTokenizer

from adatoken.calibration.flow import ANSWER, PROMPT, SPATIAL, SYSTEM
from adatoken.cli import build_parser, main
from adatoken.cli.calibrate import load_source
from adatoken.core.schedule import Schedule, curve_schedule
from adatoken.eval.datasets import load_dataset
from adatoken.eval.hf import HFAnswerer, chat_inputs, load_model_and_processor
from adatoken.eval.runner import select_subset
from tiny_models import build_model, question_file, tiny_checkpoint, tiny_llava_checkpoint

IMAGE_TOKENS = 16  # the tiny processor's 16 px image: a 4 x 4 patch grid


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava")
    tiny_llava_checkpoint(folder)
    return folder


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    return question_file(tmp_path_factory.mktemp("questions"), count=3)


def hf_args(checkpoint, questions, out, *extra):
    return ["--model", "hf", "--checkpoint", str(checkpoint), "--data", str(questions), "--device", "cpu",
            "--quiet", "--out", str(out), *extra]


def test_samples_are_the_eval_prompt_with_the_answer_after_it(checkpoint, questions):
    args = build_parser().parse_args(["analyze", *hf_args(checkpoint, questions, "unused", "--num-samples", "2")])
    source = load_source(args)
    assert len(source.samples) == 2
    processor = load_model_and_processor(checkpoint, torch.device("cpu"))[1]
    records = select_subset(load_dataset("jsonl", questions), 2, seed=0)  # as `adatoken eval --limit 2` draws them
    for sample, record in zip(source.samples, records):
        ids = sample.inputs["input_ids"][0]
        assert ids[:sample.query_index + 1].tolist() == chat_inputs(processor, [record])["input_ids"][0].tolist()
        tokens = processor.tokenizer.convert_ids_to_tokens(ids.tolist())
        # the chat template's prompt up to "ASSISTANT:", then the reference answer as its own token
        assert tokens[sample.query_index:] == ["ASSISTANT:", "red"]
        assert sample.spatial_mask[0].tolist() == [t == "<image>" for t in tokens]
        assert int(sample.spatial_mask.sum()) == IMAGE_TOKENS and "pixel_values" in sample.inputs
        assert sample.inputs["attention_mask"].tolist() == [[1] * len(tokens)]


def test_vqav2_samples_append_the_consensus_answer(checkpoint, questions, tmp_path):
    """VQAv2's ten human answers come in no order: the sample's answer is the annotation's multiple_choice_answer."""
    (tmp_path / "val2014").mkdir()
    shutil.copy(questions.parent / "img0.png", tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    (tmp_path / "q.json").write_text(json.dumps({"data_subtype": "val2014", "questions": [
        {"question_id": 1, "image_id": 42, "question": "what colour is the chair ?"}]}))
    answers = ["blue"] + ["red"] * 9
    (tmp_path / "a.json").write_text(json.dumps({"annotations": [
        {"question_id": 1, "image_id": 42, "answer_type": "other", "multiple_choice_answer": "red",
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]}]}))
    argv = hf_args(checkpoint, tmp_path / "q.json", "unused", "--dataset", "vqav2", "--answers",
                   str(tmp_path / "a.json"), "--images", str(tmp_path / "val2014"))
    (sample,) = load_source(build_parser().parse_args(["analyze", *argv])).samples
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    assert tokenizer.convert_ids_to_tokens(sample.inputs["input_ids"][0, sample.query_index + 1:].tolist()) == ["red"]


def test_textvqa_samples_read_images_beside_the_file(checkpoint, questions, tmp_path):
    (tmp_path / "train_images").mkdir()  # LLaVA's layout: the images beside the annotation file
    shutil.copy(questions.parent / "img0.png", tmp_path / "train_images" / "0054c91397f2fe05.jpg")
    (tmp_path / "val.json").write_text(json.dumps({"dataset_name": "textvqa", "dataset_type": "val", "data": [
        {"question_id": 5, "image_id": "0054c91397f2fe05", "question": "what colour is the chair ?",
         "answers": ["blue"] * 10}]}))
    argv = hf_args(checkpoint, tmp_path / "val.json", "unused", "--dataset", "textvqa")
    (sample,) = load_source(build_parser().parse_args(["analyze", *argv])).samples
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    assert tokenizer.convert_ids_to_tokens(sample.inputs["input_ids"][0, sample.query_index + 1:].tolist()) == ["blue"]


@pytest.mark.filterwarnings("ignore:the information flow is nearly flat")  # as a random model's is
def test_analyze_fit_then_eval_with_the_fitted_schedule(checkpoint, questions, tmp_path, capsys):
    calib = tmp_path / "calib"
    assert main(["analyze", *hf_args(checkpoint, questions, calib, "--num-samples", "2")]) == 0
    flow = json.loads((calib / "flow.json").read_text())
    assert flow["num_layers"] == 6 and flow["num_samples"] == 2 and flow["model"]["model_type"] == "llava"
    groups = flow["group_tokens"]  # USER: | 16 image tokens | question and ASSISTANT: | the answer "red"
    assert (groups[SYSTEM], groups[SPATIAL], groups[PROMPT], groups[ANSWER]) == (1, IMAGE_TOKENS, 7, 1)
    assert f"model: {checkpoint}, 6 layers, 2 samples" in capsys.readouterr().out

    assert main(["fit", str(calib / "flow.json"), "--retention", "0.5"]) == 0
    schedule = Schedule.load(calib / "schedule.json")
    assert schedule.retention == pytest.approx(0.5)
    fitted = schedule.counts(IMAGE_TOKENS)
    assert fitted != curve_schedule(6, 0.5).counts(IMAGE_TOKENS)  # so the eval below shows which one it ran

    out = tmp_path / "eval"
    assert main(["eval", "--model", "hf", "--checkpoint", str(checkpoint), "--dataset", "jsonl", "--data",
                 str(questions), "--methods", "adatoken3d", "--retentions", "0.5", "--schedule",
                 str(calib / "schedule.json"), "--max-new-tokens", "2", "--out", str(out), "--no-progress"]) == 0
    row = {r["key"]: r for r in json.loads((out / "report.json").read_text())["rows"]}["adatoken3d@0.5"]
    assert row["measured_retention"] == pytest.approx(schedule.retention, abs=1 / IMAGE_TOKENS)
    predictions = [json.loads(line) for line in (out / "predictions" / "rank0.jsonl").open()]
    assert len(predictions) == 3 and all(p["spatial_in"] == fitted for p in predictions)


def test_sweep_kl(checkpoint, questions, tmp_path, capsys):
    args = hf_args(checkpoint, questions, tmp_path, "--num-samples", "2", "--layers", "2", "--drop-ratios", "0", "0.9")
    assert main(["sweep", *args]) == 0
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert result["metric_name"] == "kl" and result["layers"] == [2] and result["baseline"] == 0.0
    assert result["metric"][0][0] == pytest.approx(0.0, abs=1e-9) and result["metric"][0][1] > 0.0
    assert (tmp_path / "sweep.png").is_file() and "2 samples" in capsys.readouterr().out


def test_sweep_em_scores_greedy_answers_against_the_references(checkpoint, questions, tmp_path):
    records = load_dataset("jsonl", questions)[:2]
    model, processor, _ = load_model_and_processor(checkpoint, torch.device("cpu"))
    greedy = HFAnswerer(model, processor, torch.device("cpu")).answer(records, max_new_tokens=8)
    # the first question's reference is what the unpruned model answers, the second's is not: em = 1/2
    lines = [{"question_id": r.question_id, "image": r.extra["image"], "question": r.question, "answers": [a]}
             for r, a in zip(records, [greedy[0], "no such answer"])]
    data = tmp_path / "greedy.jsonl"
    data.write_text("\n".join(map(json.dumps, lines)) + "\n")
    assert main(["sweep", *hf_args(checkpoint, data, tmp_path, "--metric", "em", "--layers", "2",
                                   "--drop-ratios", "0")]) == 0
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert result["metric_name"] == "em" and result["higher_is_better"]
    assert result["baseline"] == 0.5 and result["metric"] == [[0.5]]


@pytest.mark.parametrize("argv, message", [
    (["--model", "tiny-llama", "--checkpoint", "ckpt"], "--checkpoint: only for --model hf or testbed"),
    (["--model", "tiny-llama", "--data", "q.jsonl"], "--data: only for --model hf"),
    (["--model", "testbed", "--checkpoint", "no-such-folder"], "no testbed checkpoint in no-such-folder"),
    (["--model", "hf", "--data", "q.jsonl"], "--model hf calibrates a local checkpoint on real image questions"),
    (["--model", "hf", "--checkpoint", "ckpt"], "pass --checkpoint PATH (the model and its processor) and --data"),
    (["--model", "hf", "--checkpoint", "ckpt", "--data", "q.json", "--dataset", "vqav2", "--images", "imgs"],
     "--dataset vqav2 needs --answers beside --data"),
    (["--model", "hf", "--checkpoint", "ckpt", "--data", "q.jsonl", "--answers", "a.json"],
     "--answers: not read by --dataset jsonl, whose records name each image and its answers"),
    (["--model", "hf", "--checkpoint", "ckpt", "--data", "q.json", "--dataset", "textvqa", "--answers", "a.json"],
     "--answers: not read by --dataset textvqa"),
    (["--model", "hf", "--checkpoint", "ckpt", "--data", "q.jsonl", "--spatial-tokens", "8"],
     "--spatial-tokens sets synthetic inputs only: --model hf's images fix"),
    (["--model", "hf", "--checkpoint", "ckpt", "--data", "q.jsonl", "--num-samples", "0"],
     "--num-samples must be at least 1"),
])
def test_bad_options_are_refused_before_loading(argv, message, tmp_path, capsys):
    assert main(["analyze", *argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_em_needs_real_questions_and_one_source_at_a_time(tmp_path, capsys):
    assert main(["sweep", "--model", "tiny-llama", "--metric", "em", "--out", str(tmp_path)]) == 2
    assert "--metric em scores answers to real questions: use it with --model testbed or --model hf" \
        in capsys.readouterr().err
    with pytest.raises(SystemExit):  # two sources at once: argparse's mutually exclusive group
        main(["analyze", "--model", "hf", "--model-path", str(tmp_path)])
    assert "not allowed with argument --model" in capsys.readouterr().err


def test_bad_inputs_name_the_question_or_the_folder(checkpoint, questions, tmp_path, capsys):
    no_image = tmp_path / "no_image.jsonl"
    no_image.write_text(json.dumps({"question_id": "q7", "question": "what colour is the chair ?",
                                    "answers": ["red"]}) + "\n")
    assert main(["analyze", *hf_args(checkpoint, no_image, tmp_path / "out")]) == 2
    assert "question 'q7' has no image: --model hf answers image questions" in capsys.readouterr().err

    empty_answer = tmp_path / "empty.jsonl"
    record = json.loads(questions.read_text().splitlines()[0])
    empty_answer.write_text(json.dumps({**record, "image": str(questions.parent / record["image"]),
                                        "answers": [""]}) + "\n")
    assert main(["analyze", *hf_args(checkpoint, empty_answer, tmp_path / "out")]) == 2
    assert "question 'q0': its reference answer tokenizes to no tokens" in capsys.readouterr().err

    text_only = tmp_path / "llama"  # a text-only LLM beside a multimodal processor: no image tokens to calibrate on
    build_model("llama").save_pretrained(text_only)
    for name in ("processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (checkpoint / name).is_file():
            shutil.copy(checkpoint / name, text_only / name)
    assert main(["analyze", *hf_args(text_only, questions, tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"--checkpoint {text_only}" in err and "'llama'" in err and "no image tokens" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family, image_tokens", [("llava_next", 36), ("qwen2_vl", 30)])
def test_analyze_other_families(family, image_tokens, questions, tmp_path):
    """LLaVA-NeXT's anyres tiles, and Qwen2-VL's multimodal RoPE, whose per-token mm_token_type_ids must cover the
    appended answer too."""
    tiny_checkpoint(family, tmp_path / family)
    assert main(["analyze", *hf_args(tmp_path / family, questions, tmp_path / "calib", "--num-samples", "1")]) == 0
    flow = json.loads((tmp_path / "calib" / "flow.json").read_text())
    assert flow["model"]["model_type"] == family and flow["num_layers"] == 6
    assert flow["group_tokens"][SPATIAL] == image_tokens and flow["group_tokens"][ANSWER] == 1
