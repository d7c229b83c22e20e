"""VQAv2 image questions: the loader (official questions + annotations files, COCO image names), VQA accuracy by
hand, the reports that show it, and `adatoken eval --model hf --dataset vqav2` end to end on a tiny LLaVA-1.5."""
import json
import re

import numpy as np
import pytest
from PIL import Image

from adatoken.cli import main
from adatoken.eval.datasets import LOADERS, DatasetFormatError, load_dataset, load_vqav2
from adatoken.eval.metrics import score, score_records, vqa_accuracy, vqa_normalize
from adatoken.eval.report import Accuracy, summarize, to_markdown, wilson_interval
from adatoken.eval.runner import SweepConfig
from tiny_models import tiny_llava_checkpoint

# Questions 1 and 2 ask about image 42, question 3 about image 7; the annotations also hold question 9, which the
# questions file lacks (ignored: a subset of the questions can be scored).
QUESTIONS = [
    {"question_id": 1, "image_id": 42, "question": "what colour is the chair ?"},
    {"question_id": 2, "image_id": 42, "question": "how many chairs ?"},
    {"question_id": 3, "image_id": 7, "question": "is the chair red ?"},
]
ANSWERS = {
    1: (["red"] * 3 + ["blue"] * 7, "other", "what color is the"),
    2: (["2"] * 6 + ["two"] * 2 + ["3"] * 2, "number", "how many"),
    3: (["yes"] * 10, "yes/no", "is the"),
    9: (["no"] * 10, "yes/no", "is the"),
}


def annotation(question_id: int, image_id: int, answers: list[str], answer_type: str, question_type: str) -> dict:
    return {"question_id": question_id, "image_id": image_id, "answer_type": answer_type,
            "question_type": question_type, "multiple_choice_answer": max(set(answers), key=answers.count),
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]}


def vqa_files(folder, *, image_names: str = "COCO_val2014_{:012d}.jpg", data_subtype: str | None = "val2014",
              edit_questions=None, edit_annotations=None):
    """(questions file, annotations file, image folder) in VQAv2's official layout, images made here with PIL."""
    images = folder / "val2014"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for image_id in (42, 7):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(images / image_names.format(image_id))
    questions = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {},
                 "questions": [dict(q) for q in QUESTIONS]}
    if data_subtype is not None:
        questions["data_subtype"] = data_subtype
    image_of = {1: 42, 2: 42, 3: 7, 9: 7}
    annotations = {"info": {}, "data_subtype": "val2014",
                   "annotations": [annotation(q, image_of[q], *ANSWERS[q]) for q in ANSWERS]}
    for data, edit in ((questions, edit_questions), (annotations, edit_annotations)):
        if edit is not None:
            edit(data)
    questions_path = folder / "v2_OpenEnded_mscoco_val2014_questions.json"
    annotations_path = folder / "v2_mscoco_val2014_annotations.json"
    questions_path.write_text(json.dumps(questions))
    annotations_path.write_text(json.dumps(annotations))
    return questions_path, annotations_path, images


# --- the loader --------------------------------------------------------------------------------
def test_loader_joins_questions_annotations_and_images(tmp_path):
    questions, annotations, images = vqa_files(tmp_path)
    records = load_vqav2(questions, answers=annotations, images=images)
    assert [r.question_id for r in records] == ["1", "2", "3"]  # the questions file's order; question 9 ignored
    first = records[0]
    assert first.question == "what colour is the chair ?" and first.scene_id is None
    assert first.answers == ["red"] * 3 + ["blue"] * 7  # the ten human answers as written
    assert [r.qtype for r in records] == ["other", "number", "yes/no"]
    assert first.extra == {"image": str((images / "COCO_val2014_000000000042.jpg").resolve()), "image_id": 42,
                           "answer_format": "vqa", "question_type": "what color is the",
                           "multiple_choice_answer": "blue"}
    assert records[2].extra["image"].endswith("COCO_val2014_000000000007.jpg")
    assert "vqav2" in LOADERS
    assert load_dataset("vqav2", questions, answers=annotations, images=images) == records


@pytest.mark.parametrize("image_names", ["{:012d}.jpg", "COCO_train2014_{:012d}.jpg"])
def test_loader_finds_other_image_names_without_data_subtype(image_names, tmp_path):
    """A plain question list has no data_subtype: the image is {id:012d}.jpg or COCO_<any split>_{id:012d}.jpg."""
    questions, annotations, images = vqa_files(tmp_path, image_names=image_names, data_subtype=None)
    questions.write_text(json.dumps(QUESTIONS))
    records = load_vqav2(questions, answers=annotations, images=images)
    assert [r.extra["image"] for r in records] == [str((images / image_names.format(i)).resolve()) for i in (42, 42, 7)]


def test_subset_of_questions_is_scored(tmp_path):
    questions, annotations, images = vqa_files(tmp_path, edit_questions=lambda d: d["questions"].pop(1))
    assert [r.question_id for r in load_vqav2(questions, answers=annotations, images=images)] == ["1", "3"]


def _drop_annotation(data):
    data["annotations"] = [a for a in data["annotations"] if a["question_id"] != 2]


def _ambiguous(data):
    data.pop("data_subtype")


@pytest.mark.parametrize("edits, message", [
    (dict(edit_annotations=_drop_annotation),
     r"v2_OpenEnded_mscoco_val2014_questions.json: record 1 \(question_id 2\): no annotation with this question_id "
     r"in v2_mscoco_val2014_annotations.json"),
    (dict(edit_annotations=lambda d: d["annotations"][0]["answers"].pop()),
     r"annotations.json: record 0 \(question_id 1\): field 'answers' holds 9 answers; VQAv2 gives every question 10"),
    (dict(edit_annotations=lambda d: d["annotations"][0]["answers"][3].pop("answer")),
     r"record 0 \(question_id 1\): field 'answers' is .*expected a list of \{answer, answer_confidence, answer_id\}"),
    (dict(edit_annotations=lambda d: d["annotations"][1].update(answer_type="count")),
     r"record 1 \(question_id 2\): field 'answer_type' is 'count', expected one of 'yes/no', 'number', 'other'"),
    (dict(edit_annotations=lambda d: d["annotations"][2].update(image_id=8)),
     r"annotations.json: record 2 \(question_id 3\): image_id 8 differs from 7 in v2_OpenEnded"),
    (dict(edit_questions=lambda d: d["questions"][0].pop("question")),
     r"questions.json: record 0 \(question_id 1\): missing field 'question'"),
    (dict(edit_questions=lambda d: d["questions"][0].update(image_id="forty-two")),
     r"record 0 \(question_id 1\): field 'image_id' is 'forty-two', expected a COCO image id"),
    (dict(edit_questions=lambda d: d["questions"].append(dict(QUESTIONS[0]))),
     r"record 3: question_id '1' appears more than once"),
    (dict(edit_questions=lambda d: d.pop("questions")),
     r"questions.json: expected a JSON object with a 'questions' list \(or a JSON list of records\); "
     r"'questions' is missing"),
    (dict(edit_annotations=lambda d: d.update(annotations={})),
     r"annotations.json: expected a JSON object with a 'annotations' list .*'annotations' is dict"),
    (dict(edit_questions=lambda d: d.update(data_subtype=2014)),
     r"questions.json: field 'data_subtype' is 2014, expected a string such as 'val2014'"),
])
def test_loader_errors_name_file_record_and_what_is_valid(edits, message, tmp_path):
    questions, annotations, images = vqa_files(tmp_path, **edits)
    with pytest.raises(DatasetFormatError, match=message):
        load_vqav2(questions, answers=annotations, images=images)


def test_missing_image_names_the_paths_tried_and_the_option(tmp_path):
    questions, annotations, images = vqa_files(tmp_path)
    (images / "COCO_val2014_000000000007.jpg").unlink()
    with pytest.raises(DatasetFormatError) as error:
        load_vqav2(questions, answers=annotations, images=images)
    assert str(error.value).startswith(f"{questions}: record 2 (question_id 3): no image for image_id 7 in "
                                       f"{images.resolve()}: looked for COCO_val2014_000000000007.jpg, "
                                       "000000000007.jpg and COCO_*_000000000007.jpg")
    assert "--images FOLDER" in str(error.value)


def test_an_image_id_matching_two_files_is_refused(tmp_path):
    questions, annotations, images = vqa_files(tmp_path, data_subtype=None)
    (images / "COCO_train2014_000000000042.jpg").write_bytes((images / "COCO_val2014_000000000042.jpg").read_bytes())
    with pytest.raises(DatasetFormatError, match="image_id 42 matches 2 files .*COCO_train2014_000000000042.jpg, "
                                                 "COCO_val2014_000000000042.jpg; keep one split's images"):
        load_vqav2(questions, answers=annotations, images=images)


def test_malformed_json_and_missing_files_or_options(tmp_path):
    questions, annotations, images = vqa_files(tmp_path)
    with pytest.raises(ValueError, match=r"pass answers=ANNOTATIONS.json \(adatoken eval: --answers\)"):
        load_vqav2(questions, images=images)
    with pytest.raises(ValueError, match=r"need their images: pass images=FOLDER \(adatoken eval: --images FOLDER\)"):
        load_vqav2(questions, answers=annotations)
    with pytest.raises(FileNotFoundError, match=re.escape(f"image folder not found: {tmp_path / 'absent'}")):
        load_vqav2(questions, answers=annotations, images=tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=re.escape(f"not found: {tmp_path / 'absent.json'}")):
        load_vqav2(questions, answers=tmp_path / "absent.json", images=images)
    annotations.write_text('{"annotations": [\n{"question_id": 1,\n')
    with pytest.raises(DatasetFormatError, match=re.escape(f"{annotations}: not valid JSON") + ".* line 3"):
        load_vqav2(questions, answers=annotations, images=images)


# --- the metric ---------------------------------------------------------------------------------
@pytest.mark.parametrize("matches, expected", [
    (0, 0.0),
    (1, 0.3),   # 1 subset loses the match (0), 9 keep it (1/3): 9/3/10
    (2, 0.6),   # 2 subsets keep 1 (1/3), 8 keep 2 (2/3): (2/3 + 16/3)/10
    (3, 0.9),   # 3 subsets keep 2 (2/3), 7 keep 3 (1): (2 + 7)/10
    (4, 1.0),   # every subset keeps at least 3
    (10, 1.0),
])
def test_vqa_accuracy_by_hand(matches, expected):
    answers = ["red"] * matches + ["blue"] * (10 - matches)
    assert vqa_accuracy("red", answers) == pytest.approx(expected)


def test_vqa_accuracy_is_not_the_plain_min_of_matches_over_three():
    answers = ["red"] * 3 + ["blue"] * 7
    assert vqa_accuracy("red", answers) == pytest.approx(0.9) != min(1, 3 / 3)


@pytest.mark.parametrize("raw, normalized", [
    ("Two", "2"), ("the dog.", "dog"), ("yes!", "yes"), ("Yes", "yes"), ("A red car", "red car"),
    ("none", "0"), ("3.5", "3.5"), ("1,000", "1000"), ("dont", "don't"), ("red/white", "red white"),
    ("red / white", "red white"), ("  two\tdogs \n", "2 dogs"), ("x-ray", "x ray"), ("a.m.", "am"),
])
def test_vqa_normalize(raw, normalized):
    assert vqa_normalize(raw) == normalized


def test_vqa_accuracy_normalises_both_sides():
    assert vqa_accuracy("Two", ["2"] * 10) == 1.0
    assert vqa_accuracy("The dog.", ["dog"] * 10) == 1.0  # the reference scores this 0: its answers all agree
    assert vqa_accuracy("yes!", ["yes"] * 2 + ["no"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("two", ["2"] * 3 + ["two"] * 3 + ["3"] * 4) == 1.0  # six match after normalising
    assert vqa_accuracy("", ["yes"] * 10) == 0.0


@pytest.mark.parametrize("answers", [[], "yes", [1]])
def test_vqa_accuracy_refuses_bad_answers(answers):
    with pytest.raises(ValueError, match="expected a non-empty list of strings"):
        vqa_accuracy("yes", answers)


def test_score_adds_vqa_accuracy_only_when_asked(tmp_path):
    references = [ANSWERS[1][0], ANSWERS[2][0], ANSWERS[3][0]]
    plain = score(["red", "Two", "no"], references, qtypes=["other", "number", "yes/no"], ngram=False)
    assert "vqa_accuracy" not in plain and "vqa_accuracy" not in plain["samples"][0]
    assert "vqa_accuracy" not in plain["by_type"]["other"]
    vqa = score(["red", "Two", "no"], references, qtypes=["other", "number", "yes/no"], ngram=False, vqa=True)
    assert [s["vqa_accuracy"] for s in vqa["samples"]] == pytest.approx([0.9, 1.0, 0.0])
    assert vqa["vqa_accuracy"] == pytest.approx(1.9 / 3)
    assert list(vqa["by_type"]) == ["yes/no", "number", "other"]  # VQA's order, not first appearance
    assert vqa["by_type"]["other"] == {"n": 1, "em": 1.0, "refined_em": 1.0, "vqa_accuracy": pytest.approx(0.9)}
    questions, annotations, images = vqa_files(tmp_path)
    records = load_vqav2(questions, answers=annotations, images=images)
    by_records = score_records(records, {"1": "red", "2": "Two", "3": "no"}, ngram=False)
    assert by_records["vqa_accuracy"] == pytest.approx(1.9 / 3)  # records marked answer_format "vqa"


# --- reports ------------------------------------------------------------------------------------
def _rows(config: str, qtype_answers: list[tuple[str | None, list[str]]], predictions: list[str]) -> list[dict]:
    """Prediction rows as the runner writes them (the fields summarize reads)."""
    return [{"config": config, "question_id": str(i), "prediction": p, "references": refs, "qtype": qtype,
             "spatial_in": [16, 16, 8], "prefill_flops": 1e9, "batch": "0", "batch_prefill_s": 0.01,
             "batch_answer_s": 0.1} for i, (p, (qtype, refs)) in enumerate(zip(predictions, qtype_answers))]


def test_vqa_report_shows_vqa_accuracy_and_answer_types():
    questions = [("other", ANSWERS[1][0]), ("number", ANSWERS[2][0]), ("yes/no", ANSWERS[3][0])]
    configs = [SweepConfig("none", None, None)]
    rows, metrics = summarize(configs, {"none": _rows("none", questions, ["red", "Two", "no"])}, vqa=True)
    [row] = rows
    assert row.vqa_acc.value == pytest.approx(1.9 / 3) and row.vqa_acc.n == 3
    assert row.vqa_acc.ci95 == pytest.approx(wilson_interval(1.9, 3))
    assert list(row.vqa_by_type) == ["yes/no", "number", "other"]
    assert row.vqa_by_type["other"].value == pytest.approx(0.9)
    assert metrics["none"]["vqa_accuracy"] == pytest.approx(1.9 / 3)
    markdown = to_markdown(rows, {"model": "m", "dataset": "vqav2"})
    assert "| method | retention | measured | final | VQA acc % | EM % | refined EM % |" in markdown
    assert "| none | 1 | 0.833 | 0.500 | 63.3 [" in markdown
    assert "## VQA accuracy by answer type" in markdown and "| yes/no (n=1) | number (n=1) | other (n=1) |" in markdown


def test_other_reports_do_not_change():
    """Without vqa=True (every set but vqav2): no VQA column, key or table."""
    questions = [("what", ["piano"]), ("other", ["yes"])]
    rows, metrics = summarize([SweepConfig("none", None, None)], {"none": _rows("none", questions, ["piano", "no"])})
    assert rows[0].vqa_acc is None and "vqa_accuracy" not in metrics["none"]
    markdown = to_markdown(rows, {"model": "m", "dataset": "sqa3d"})
    assert "VQA" not in markdown and "## EM by question type" in markdown
    # a type the subset lacks (SQA3D tables list all six) reads "–" instead of failing
    assert rows[0].em_by_type["can"] == Accuracy(0, None, (0.0, 1.0))
    assert "| none | 1 | 100.0 [" in markdown.split("## EM by question type")[1]


def test_accuracy_of_scores_is_wilson_at_the_mean():
    assert Accuracy.of([True, False, True, True]) == Accuracy.of_scores([1.0, 0.0, 1.0, 1.0])
    acc = Accuracy.of_scores([0.9, 0.6, 1.0, 0.0])
    assert acc.value == pytest.approx(0.625) and acc.ci95 == pytest.approx(wilson_interval(2.5, 4))
    assert Accuracy.of_scores([0.0] * 5).ci95[1] > 0  # no collapse to a point, as a sample-variance interval would


# --- end to end ---------------------------------------------------------------------------------
def test_eval_hf_on_vqav2(tmp_path, capsys):

    checkpoint = tmp_path / "llava"
    tiny_llava_checkpoint(checkpoint)
    questions, annotations, images = vqa_files(tmp_path)
    out = tmp_path / "eval"
    assert main(["eval", "--model", "hf", "--checkpoint", str(checkpoint), "--dataset", "vqav2",
                 "--data", str(questions), "--answers", str(annotations), "--images", str(images),
                 "--methods", "none", "fastv", "--retentions", "0.4", "--max-new-tokens", "2",
                 "--no-progress", "--out", str(out)]) == 0
    markdown = (out / "report.md").read_text()
    assert "| VQA acc % | EM % |" in markdown and "## VQA accuracy by answer type" in markdown
    report = json.loads((out / "report.json").read_text())
    assert [row["key"] for row in report["rows"]] == ["none", "fastv@0.4"]
    assert all(row["vqa_acc"]["n"] == 3 for row in report["rows"])
    assert "--images " + str(images) in report["context"]["command"]
    metrics = json.loads((out / "metrics.json").read_text())["configs"]
    assert 0.0 <= metrics["fastv@0.4"]["vqa_accuracy"] <= 1.0
    assert list(metrics["none"]["by_type"]) == ["yes/no", "number", "other"]
    assert main(["eval", "--model", "hf", "--checkpoint", str(checkpoint), "--dataset", "vqav2",
                 "--data", str(questions), "--answers", str(annotations), "--methods", "none", "--no-progress",
                 "--out", str(tmp_path / "eval2")]) == 2
    assert "--images FOLDER" in capsys.readouterr().err
