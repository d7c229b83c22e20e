"""VQAv2 and TextVQA image questions: the loaders (VQAv2's official questions + annotations files and COCO image
names; TextVQA's TextVQA_0.5.1_val.json and its train_images folder), VQA accuracy by hand (VQAv2-style and
TextVQA-style answers), the reports that show it, and `adatoken eval --model hf --dataset vqav2` end to end on a
tiny LLaVA-1.5."""
import json
import re

import numpy as np
import pytest
from PIL import Image

from adatoken.cli import main
from adatoken.eval.datasets import LOADERS, DatasetFormatError, load_dataset, load_textvqa, load_vqav2
from adatoken.eval.metrics import score, score_records, vqa_accuracy, vqa_normalize
from adatoken.eval.report import Accuracy, summarize, to_markdown, wilson_interval
from adatoken.eval.runner import SweepConfig, select_subset
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


# --- TextVQA ------------------------------------------------------------------------------------
# Three questions in TextVQA's style: OCR answers whose case and punctuation vary among the ten humans. Question
# 34603 asks about the same image as 34602; 34604 about another one.
TEXTVQA_IMAGES = ("0054c91397f2fe05", "00685bc495504d61")
TEXTVQA_DATA = [
    {"question_id": 34602, "question": "what brand is this phone?", "image_id": TEXTVQA_IMAGES[0],
     # normalised: "nokia" x 3 (case and the final period go), "nokia 3310" x 4, "unanswerable" x 3
     "answers": ["Nokia", "nokia", "NOKIA."] + ["nokia 3310"] * 4 + ["unanswerable"] * 3},
    {"question_id": 34603, "question": "what number is on the jersey?", "image_id": TEXTVQA_IMAGES[0],
     # "#" is not among the marks VQA normalisation removes: "#23" stays "#23"; "23." becomes "23", "no. 23" "no 23"
     "answers": ["23", "#23", "#23", "#23", "#23", "23.", "no. 23", "jordan 23", "jordan", "#23"]},
    {"question_id": 34604, "question": "what does the can say?", "image_id": TEXTVQA_IMAGES[1],
     # "coca-cola" -> "coca cola" (a hyphen inside a word becomes a space), "coca - cola" -> "coca cola" (beside a
     # space it is deleted, and the spaces collapse), "Coca Cola" -> "coca cola": 3 of the 10
     "answers": ["coca-cola", "Coca Cola", "cocacola", "coke", "coke", "coke", "coke", "coca cola classic", "pepsi",
                 "coca - cola"]},
]


def textvqa_file(folder, *, edit=None, images: bool = True):
    """TextVQA_0.5.1_val.json in the official layout (every field of a record) with its train_images/ folder beside
    it, JPEGs made here with PIL; `edit(data)` changes the parsed file before it is written."""
    if images:
        (folder / "train_images").mkdir(exist_ok=True)
        rng = np.random.default_rng(1)
        for image_id in TEXTVQA_IMAGES:
            pixels = rng.integers(0, 255, (18, 22, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "train_images" / f"{image_id}.jpg")
    records = [{"question": q["question"], "image_id": q["image_id"], "image_classes": ["Mobile phone"],
                "flickr_original_url": "https://farm1.staticflickr.com/1/1_o.jpg",
                "flickr_300k_url": "https://c1.staticflickr.com/1/1/1_z.jpg", "image_width": 1024,
                "image_height": 768, "answers": list(q["answers"]),
                "question_tokens": q["question"].rstrip("?").split(), "question_id": q["question_id"],
                "set_name": "val"} for q in TEXTVQA_DATA]
    data = {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": records}
    if edit is not None:
        edit(data)
    path = folder / "TextVQA_0.5.1_val.json"
    path.write_text(json.dumps(data))
    return path


def test_textvqa_loader_reads_questions_answers_and_images(tmp_path):
    path = textvqa_file(tmp_path)
    records = load_textvqa(path)  # images from train_images/ beside the file, LLaVA's layout
    assert [r.question_id for r in records] == ["34602", "34603", "34604"]  # the file's order, ids as strings
    first = records[0]
    assert (first.question, first.scene_id, first.qtype) == ("what brand is this phone?", None, None)
    assert first.answers == TEXTVQA_DATA[0]["answers"]  # the ten answers as written: scoring normalises them
    image = (tmp_path / "train_images" / "0054c91397f2fe05.jpg").resolve()
    assert first.extra == {"image": str(image), "image_id": "0054c91397f2fe05", "answer_format": "vqa",
                           "image_classes": ["Mobile phone"], "set_name": "val"}
    assert records[2].extra["image"] == str((tmp_path / "train_images" / "00685bc495504d61.jpg").resolve())
    assert Image.open(first.extra["image"]).size == (22, 18)  # a real, readable image, as --model hf opens it
    assert "textvqa" in LOADERS
    assert load_dataset("textvqa", path) == records
    # --limit takes the first N of a seeded shuffle, as for every loader: a subset in file order
    subset = select_subset(records, 2, seed=0)
    assert len(subset) == 2 and [r.question_id for r in subset] == sorted(r.question_id for r in subset)


def test_textvqa_images_from_another_folder(tmp_path):
    path = textvqa_file(tmp_path)
    elsewhere = tmp_path / "textvqa_images"
    (tmp_path / "train_images").rename(elsewhere)
    records = load_textvqa(path, images=elsewhere)
    assert records[1].extra["image"] == str((elsewhere / "0054c91397f2fe05.jpg").resolve())
    assert load_dataset("textvqa", path, images=elsewhere) == records


def _add_unanswered(data):
    data["data"].append({k: v for k, v in data["data"][0].items() if k != "answers"} | {"question_id": 50000})


@pytest.mark.parametrize("edit, message", [
    # files that are not TextVQA: what was found and what is expected
    (lambda d: d.update(dataset_name="textcaps"),
     r"TextVQA_0.5.1_val.json: not a TextVQA file: dataset_name is 'textcaps', expected 'textvqa'"),
    (lambda d: (d.update(questions=d.pop("data")), d.update(data_subtype="val2014")),  # a VQAv2 questions file
     r"not a TextVQA file: found no 'data' list \(top-level fields: data_subtype, dataset_name, dataset_type, "
     r"dataset_version, questions\), expected a JSON object \{\"dataset_name\": \"textvqa\", \"data\": \[...\]\}"),
    (lambda d: d.update(data={"34602": {}}), r"not a TextVQA file: found a 'data' of type dict"),
    # the test split: no answers to score against
    (lambda d: (d.update(dataset_type="test"), [r.pop("answers") for r in d["data"]]),
     r"TextVQA_0.5.1_val.json: dataset_type is 'test': TextVQA's test split has no public answers"),
    (_add_unanswered,
     r"record 3 \(question_id 50000\): no 'answers' field: TextVQA's test split \(TextVQA_0.5.1_test.json\) has no "
     r"public answers and cannot be scored here; use TextVQA_0.5.1_val.json"),
    # broken records: the file, the record and what was expected
    (lambda d: d["data"][1]["answers"].pop(),
     r"record 1 \(question_id 34603\): field 'answers' holds 9 answers; TextVQA gives every question 10"),
    (lambda d: d["data"][0]["answers"].__setitem__(4, None),
     r"record 0 \(question_id 34602\): field 'answers' is .*expected a non-empty list of strings"),
    (lambda d: d["data"][2].pop("question"), r"record 2 \(question_id 34604\): missing field 'question'"),
    (lambda d: d["data"][0].update(image_id="../0054c91397f2fe05"),
     r"record 0 \(question_id 34602\): field 'image_id' is '../0054c91397f2fe05', expected an image id"),
    (lambda d: d["data"][0].update(image_id=12), r"field 'image_id' is 12, expected a string"),
    (lambda d: d["data"][2].update(question_id=34602), r"record 2: question_id '34602' appears more than once"),
])
def test_textvqa_errors_name_file_record_and_what_is_expected(edit, message, tmp_path):
    path = textvqa_file(tmp_path, edit=edit)
    with pytest.raises(DatasetFormatError, match=message):
        load_textvqa(path)


def test_textvqa_refuses_a_json_list_and_a_jsonl_file(tmp_path):
    path = tmp_path / "TextVQA_0.5.1_val.json"
    path.write_text(json.dumps(TEXTVQA_DATA))
    with pytest.raises(DatasetFormatError, match=r"not a TextVQA file: found a JSON list, expected a JSON object"):
        load_textvqa(path)
    # LLaVA's question file (llava_textvqa_val_v051_ocr.jsonl) is a prompt list, not the annotation file
    path.write_text('{"question_id": "0054c91397f2fe05", "text": "what brand?"}\n'
                    '{"question_id": "00685bc495504d61", "text": "what does the can say?"}\n')
    with pytest.raises(DatasetFormatError, match=re.escape(f"{path}: not valid JSON") +
                       r".*expected TextVQA annotation file \(e.g. TextVQA_0.5.1_val.json\)"):
        load_textvqa(path)


def test_textvqa_missing_file_folder_or_image(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"TextVQA annotation file (e.g. TextVQA_0.5.1_val.json) "
                                                          f"not found: {tmp_path / 'absent.json'}")):
        load_textvqa(tmp_path / "absent.json")
    path = textvqa_file(tmp_path, images=False)
    with pytest.raises(FileNotFoundError) as error:
        load_textvqa(path)
    assert str(error.value).startswith(f"TextVQA image folder not found: {tmp_path / 'train_images'}; the images "
                                       "({image_id}.jpg) are read from train_images/ beside the annotation file")
    assert "images=FOLDER" in str(error.value)
    with pytest.raises(FileNotFoundError, match=re.escape(f"image folder not found: {tmp_path / 'other'}")):
        load_textvqa(path, images=tmp_path / "other")
    textvqa_file(tmp_path)
    (tmp_path / "train_images" / "00685bc495504d61.jpg").unlink()
    with pytest.raises(DatasetFormatError) as error:
        load_textvqa(path)
    missing = (tmp_path / "train_images" / "00685bc495504d61.jpg").resolve()
    assert str(error.value).startswith(f"{path}: record 2 (question_id 34604): no image for image_id "
                                       f"'00685bc495504d61': {missing} not found")


# TextVQA's evaluator (LLaVA's llava/eval/m4c_evaluator.py, from MMF) scores the same VQA accuracy: each of the ten
# answers left out in turn, min(1, matches among the other nine / 3), averaged; prediction and answers normalised.
@pytest.mark.parametrize("question, prediction, expected", [
    (0, "Nokia", 0.9),         # 3 matches after case and the period go: 3 subsets keep 2 (2/3), 7 keep 3 (1)
    (0, "nokia", 0.9),         # as written only 1 answer is "nokia" (0.3): the normalisation matters
    (0, "Nokia 3310", 1.0),    # 4 matches: every subset keeps 3
    (0, "unanswerable", 0.9),
    (1, "23", 0.6),            # "23" and "23.": 2 subsets keep 1 (1/3), 8 keep 2 (2/3)
    (1, "#23", 1.0),           # 5 "#23": "#" is not removed, so "#23" and "23" differ
    (1, "Jordan", 0.3),        # 1 match: 9 subsets keep it (1/3), 1 loses it
    (2, "Coca-Cola.", 0.9),    # "coca cola" = "coca-cola", "Coca Cola", "coca - cola"
    (2, "COKE", 1.0),
    (2, "cocacola", 0.3),
    (2, "sprite", 0.0),
])
def test_textvqa_style_vqa_accuracy_by_hand(question, prediction, expected):
    assert vqa_accuracy(prediction, TEXTVQA_DATA[question]["answers"]) == pytest.approx(expected)


def test_textvqa_departures_from_the_m4c_normalisation():
    """adatoken normalises TextVQA answers as VQAv2's evaluator does; m4c_evaluator first deletes every comma and
    question mark and splits a possessive 's off (docs/metrics.md). Both sides get the same steps, so scores differ
    only where two strings differ in just those ways, as here (m4c would score these 0 and 1)."""
    assert vqa_accuracy("red blue", ["red,blue"] * 10) == 1.0   # the comma becomes a space here, m4c deletes it
    assert vqa_accuracy("mcdonald 's", ["mcdonald's"] * 10) == 0.0  # m4c makes both "mcdonald 's"


def test_textvqa_records_are_scored_with_vqa_accuracy(tmp_path):
    records = load_textvqa(textvqa_file(tmp_path))
    predictions = {"34602": "Nokia", "34603": "23", "34604": "Coca-Cola."}
    scores = score_records(records, predictions, ngram=False)  # answer_format "vqa": VQA accuracy without asking
    assert [s["vqa_accuracy"] for s in scores["samples"]] == pytest.approx([0.9, 0.6, 0.9])
    assert scores["vqa_accuracy"] == pytest.approx(2.4 / 3)
    # EM counts a match with any one answer after adatoken's cleaning: all three predictions have one
    assert scores["em"] == 1.0
    assert scores["by_type"] is None  # TextVQA has no answer types


def test_textvqa_report_shows_vqa_accuracy_without_a_type_table():
    questions = [(None, q["answers"]) for q in TEXTVQA_DATA]
    rows, metrics = summarize([SweepConfig("none", None, None)],
                              {"none": _rows("none", questions, ["Nokia", "23", "Coca-Cola."])}, vqa=True)
    assert rows[0].vqa_acc.value == pytest.approx(0.8) and rows[0].vqa_acc.n == 3
    assert rows[0].vqa_by_type == {} and metrics["none"]["by_type"] is None
    markdown = to_markdown(rows, {"model": "m", "dataset": "textvqa"})
    assert "| VQA acc % | EM % |" in markdown and "| none | 1 | 0.833 | 0.500 | 80.0 [" in markdown
    assert "by answer type" not in markdown and "by question type" not in markdown


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
