"""Loaders for question-answering evaluation sets, all returning `QARecord`s.

Formats read: ScanQA's ScanQA_v1.0_{split}.json, SQA3D's balanced questions + annotations files,
LLaVA-3D's evaluation question/answer files, VQAv2's questions + annotations files with a folder of
COCO images, TextVQA's TextVQA_0.5.1_{train,val}.json with its train_images folder, and a plain JSONL.
Nothing is ever downloaded: every loader reads the files it is given, and a missing file, field or
malformed record raises an error that names the file, the record and what was expected.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from adatoken.eval.boxes import as_box, unique_multiple
from adatoken.eval.metrics import SQA3D_TYPES, VQA_ANSWER_TYPES, VQA_NUM_ANSWERS, sqa3d_question_type

SQA3D_SPLITS = ("train", "val", "test")


class DatasetFormatError(ValueError):
    """A dataset file exists but does not hold what its loader expects."""


@dataclass
class QARecord:
    """One evaluation question. question_id is always a string (SQA3D's integer ids included)."""

    question_id: str
    scene_id: str | None
    question: str
    answers: list[str]
    qtype: str | None = None
    situation: str | None = None
    extra: dict = field(default_factory=dict)


# --- reading files -------------------------------------------------------------------------
def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")


def _read_json(path: Path, what: str):
    _require_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetFormatError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, "
                                 f"column {exc.colno}); expected {what}") from None


def _read_jsonl(path: Path, what: str) -> list[tuple[str, object]]:
    """(location, parsed line) for every non-blank line; locations read 'line N'."""
    _require_file(path, what)
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DatasetFormatError(f"{path}: line {number} is not valid JSON ({exc.msg} at "
                                     f"column {exc.colno}); expected one JSON object per line") from None
    return rows


def _read_records(path: Path, what: str, container_key: str | None = None) -> list[tuple[str, object]]:
    """(location, record) pairs from a JSON list, or from data[container_key] when given."""
    data = _read_json(path, what)
    if container_key is not None:
        if not isinstance(data, dict) or container_key not in data:
            raise DatasetFormatError(f"{path}: expected a JSON object with a {container_key!r} list")
        data = data[container_key]
    if not isinstance(data, list):
        raise DatasetFormatError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return [(f"record {i}", record) for i, record in enumerate(data)]


def _read_json_or_jsonl(path: Path, what: str) -> list[tuple[str, object]]:
    # LLaVA-3D's files come both ways, whatever their suffix: a JSON list, or one object per line.
    _require_file(path, what)
    if path.read_text(encoding="utf-8").lstrip().startswith("["):
        return _read_records(path, what)
    return _read_jsonl(path, what)


# --- reading fields ------------------------------------------------------------------------
class _Record:
    """A record being read: each accessor checks one field and names file and record if it fails."""

    def __init__(self, path: Path, location: str, data: object):
        self.path, self.location, self.data = path, location, data
        if not isinstance(data, dict):
            self.fail(f"expected a JSON object, got {type(data).__name__}")
        qid = data.get("question_id")
        if isinstance(qid, (str, int)) and not isinstance(qid, bool):
            self.location = f"{location} (question_id {qid!r})"

    def fail(self, what: str) -> NoReturn:
        raise DatasetFormatError(f"{self.path}: {self.location}: {what}")

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def get(self, key: str):
        if key not in self.data:
            self.fail(f"missing field {key!r} (fields present: {', '.join(sorted(self.data)) or 'none'})")
        return self.data[key]

    def text(self, key: str) -> str:
        value = self.get(key)
        if not isinstance(value, str):
            self.fail(f"field {key!r} is {value!r}, expected a string")
        return value

    def optional_text(self, key: str) -> str | None:
        return self.text(key) if self.has(key) else None

    def question_id(self, key: str = "question_id") -> str:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            self.fail(f"field {key!r} is {value!r}, expected a string or an integer")
        return str(value)

    def answers(self, key: str = "answers") -> list[str]:
        value = self.get(key)
        if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
            self.fail(f"field {key!r} is {value!r}, expected a non-empty list of strings")
        return list(value)

    def rest(self, *consumed: str) -> dict:
        return {k: v for k, v in self.data.items() if k not in consumed}


def _check_unique(records: list[QARecord], path: Path) -> list[QARecord]:
    seen = set()
    for i, record in enumerate(records):
        if record.question_id in seen:
            raise DatasetFormatError(f"{path}: record {i}: question_id {record.question_id!r} "
                                     "appears more than once; ids must be unique")
        seen.add(record.question_id)
    return records


def _by_question_id(path: Path, rows) -> dict[str, _Record]:
    """Every (location, data) row of a file as a _Record, by its question_id; a repeated id is an error."""
    records: dict[str, _Record] = {}
    for location, data in rows:
        record = _Record(path, location, data)
        if record.question_id() in records:
            record.fail("question_id appears more than once; ids must be unique")
        records[record.question_id()] = record
    return records


def _records(path: Path, rows, build) -> list[QARecord]:
    """`build(_Record)` for every (location, data) row of a file, checked for unique question ids."""
    return _check_unique([build(_Record(path, location, data)) for location, data in rows], path)


# --- loaders -------------------------------------------------------------------------------
def load_scanqa(path: str | Path) -> list[QARecord]:
    """ScanQA_v1.0_{train,val}.json: a list of {question_id, scene_id, question, answers,
    object_ids, object_names}. The test files carry no answers and cannot be scored."""
    path = Path(path)
    return _records(path, _read_records(path, "ScanQA file (e.g. ScanQA_v1.0_val.json)"), lambda r: QARecord(
        question_id=r.question_id(), scene_id=r.text("scene_id"), question=r.text("question"),
        answers=r.answers(), extra=r.rest("question_id", "scene_id", "question", "answers"),
    ))


def load_sqa3d(path: str | Path, split: str = "test") -> list[QARecord]:
    """SQA3D from the directory holding v1_balanced_questions_{split}_scannetv2.json and
    v1_balanced_sqa_annotations_{split}_scannetv2.json, joined by question_id.

    Records follow the annotations file's order; qtype is typed from the question text
    (`sqa3d_question_type`) because the files' own question_type field is "N/A".
    """
    if split not in SQA3D_SPLITS:
        raise ValueError(f"unknown SQA3D split {split!r}; valid: {', '.join(SQA3D_SPLITS)}")
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"SQA3D directory not found: {directory} (expected the folder "
                                "holding the v1_balanced_* files, e.g. sqa_task/balanced)")
    questions_path = directory / f"v1_balanced_questions_{split}_scannetv2.json"
    annotations_path = directory / f"v1_balanced_sqa_annotations_{split}_scannetv2.json"

    questions = _by_question_id(questions_path, _read_records(questions_path, "SQA3D questions file", "questions"))
    annotated = _by_question_id(annotations_path,
                                _read_records(annotations_path, "SQA3D annotations file", "annotations"))
    records = []
    for qid, a in annotated.items():
        q = questions.get(qid)
        if q is None:
            a.fail(f"no question with this id in {questions_path.name}")
        scene_id = a.text("scene_id")
        if q.text("scene_id") != scene_id:
            a.fail(f"scene_id {scene_id!r} differs from {q.text('scene_id')!r} in {questions_path.name}")
        answer_list = a.get("answers")
        if not isinstance(answer_list, list) or not answer_list:
            a.fail(f"field 'answers' is {answer_list!r}, expected a non-empty list of {{answer, answer_id}}")
        answers = []
        for answer in answer_list:
            if not isinstance(answer, dict) or not isinstance(answer.get("answer"), str):
                a.fail(f"answer {answer!r} is not an object with a string 'answer'")
            answers.append(answer["answer"])
        question = q.text("question")
        records.append(QARecord(
            question_id=qid, scene_id=scene_id, question=question, answers=answers,
            qtype=sqa3d_question_type(question), situation=q.text("situation"),
            extra={**q.rest("question_id", "scene_id", "question", "situation"),
                   **a.rest("question_id", "scene_id", "answers")},
        ))
    unanswered = [qid for qid in questions if qid not in annotated]
    if unanswered:
        raise DatasetFormatError(f"{questions_path}: {len(unanswered)} questions have no annotation in "
                                 f"{annotations_path.name} (first: {unanswered[0]!r})")
    return records


def load_llava3d(path: str | Path, answers: str | Path | None = None) -> list[QARecord]:
    """LLaVA-3D's evaluation files: questions (e.g. llava-3d-scanqa_val_question.json) and answers
    (e.g. llava3d_scanqa_val_answer.json), each a JSON list or JSONL, joined by question_id.

    A question is {question_id, text, video | scene_id}; `text` is the prompt as the model saw it
    (for SQA3D: situation + question). An answer is {question_id, text: str | [str], type?} where
    type 0..5 indexes SQA3D_TYPES. Without an answers file each question must carry `answers`.
    Answers for questions not in the question file are ignored, so a question subset can be scored.
    """
    path = Path(path)
    by_id: dict[str, _Record] = {}
    if answers is not None:
        answers_path = Path(answers)
        for location, data in _read_json_or_jsonl(answers_path, "LLaVA-3D answers file"):
            a = _Record(answers_path, location, data)
            by_id[a.question_id()] = a

    records = []
    for location, data in _read_json_or_jsonl(path, "LLaVA-3D questions file"):
        q = _Record(path, location, data)
        qid = q.question_id()
        if answers is None:
            if not q.has("answers"):
                q.fail("no 'answers' field and no answers file given; pass answers=PATH "
                       "(e.g. llava3d_scanqa_val_answer.json)")
            source, answer_list = q, q.answers()
        else:
            source = by_id.get(qid)
            if source is None:
                q.fail(f"no answer with this id in {answers_path.name}")
            answer_list = _llava3d_answers(source)
        # The type sits in the answers file in LLaVA-3D's release, in the questions in some copies.
        typed = source if source.has("type") else q
        records.append(QARecord(
            question_id=qid, scene_id=_llava3d_scene_id(q), question=q.text("text"), answers=answer_list,
            qtype=_llava3d_type(typed) if typed.has("type") else None,
            extra=q.rest("question_id", "text", "answers", "type", "scene_id"),
        ))
    return _check_unique(records, path)


def _llava3d_answers(a: _Record) -> list[str]:
    # ScanQA answer files hold a list of answers, SQA3D's a single string.
    if isinstance(a.get("text"), str):
        return [a.text("text")]
    return a.answers("text")


def _llava3d_scene_id(q: _Record) -> str:
    if q.has("scene_id"):
        return q.text("scene_id")
    if q.has("video"):  # "scannet/scene0011_00" (sometimes with a file suffix)
        return Path(q.text("video")).stem
    q.fail("missing both 'scene_id' and 'video'; expected one of them to name the scene")


def _llava3d_type(r: _Record) -> str:
    value = r.get("type")
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(SQA3D_TYPES):
        r.fail(f"field 'type' is {value!r}, expected an integer 0..5 "
               f"({', '.join(f'{i}={t}' for i, t in enumerate(SQA3D_TYPES))})")
    return SQA3D_TYPES[value]


def load_jsonl(path: str | Path) -> list[QARecord]:
    """adatoken's plain format: one {question_id, question, answers, scene_id?, qtype?, situation?, image?}
    per line; any other keys go to `extra`. `image` (for 2D models) is a file path, relative to the JSONL
    file's folder or absolute; it must exist, and extra["image"] holds it resolved."""
    path = Path(path)

    def build(r: _Record) -> QARecord:
        extra = r.rest("question_id", "scene_id", "question", "answers", "qtype", "situation")
        if r.has("image"):
            image = (path.parent / r.text("image")).resolve()
            if not image.is_file():
                r.fail(f"image file not found: {image}")
            extra["image"] = str(image)
        return QARecord(question_id=r.question_id(), scene_id=r.optional_text("scene_id"), question=r.text("question"),
                        answers=r.answers(), qtype=r.optional_text("qtype"), situation=r.optional_text("situation"),
                        extra=extra)

    return _records(path, _read_jsonl(path, "JSONL question file"), build)


# --- VQAv2 ---------------------------------------------------------------------------------
VQA_IMAGES_HINT = "images=FOLDER (adatoken eval: --images FOLDER), the folder holding the COCO images, e.g. val2014"


def load_vqav2(path: str | Path, answers: str | Path | None = None, images: str | Path | None = None) -> list[QARecord]:
    """VQAv2 (or v1) in the official format: the questions file (v2_OpenEnded_mscoco_val2014_questions.json:
    {"data_subtype": "val2014", "questions": [{question_id, image_id, question}]}, or a plain list of those),
    `answers=` the annotations file (v2_mscoco_val2014_annotations.json: {"annotations": [{question_id, image_id,
    answers: [{answer, answer_confidence, answer_id}] x 10, multiple_choice_answer, answer_type, question_type}]})
    and `images=` the folder of COCO images, joined by question_id.

    Records follow the questions file; annotations of other questions are ignored, so a subset can be scored.
    answers are the ten human answers as written, qtype the answer type (VQA_ANSWER_TYPES), extra["image"] the
    image's path (`_CocoImages`) and extra["answer_format"] "vqa", which makes score_records add VQA accuracy.
    """
    path = Path(path)
    if answers is None:
        raise ValueError(f"{path}: VQAv2 questions carry no answers; pass answers=ANNOTATIONS.json "
                         "(adatoken eval: --answers), e.g. v2_mscoco_val2014_annotations.json")
    if images is None:
        raise ValueError(f"{path}: VQAv2 questions need their images: pass {VQA_IMAGES_HINT}")
    annotations_path = Path(answers)
    header, rows = _vqa_file(path, "VQAv2 questions file (e.g. v2_OpenEnded_mscoco_val2014_questions.json)",
                             "questions")
    split = header.get("data_subtype")
    if split is not None and not isinstance(split, str):
        raise DatasetFormatError(f"{path}: field 'data_subtype' is {split!r}, expected a string such as 'val2014'")
    coco = _CocoImages(Path(images), split)
    _, annotation_rows = _vqa_file(annotations_path, "VQAv2 annotations file (e.g. v2_mscoco_val2014_annotations.json)",
                                   "annotations")
    annotated = _by_question_id(annotations_path, annotation_rows)

    records = []
    for location, data in rows:
        q = _Record(path, location, data)
        a = annotated.get(q.question_id())
        if a is None:
            q.fail(f"no annotation with this question_id in {annotations_path.name}")
        image_id = _vqa_image_id(q)
        if _vqa_image_id(a) != image_id:
            a.fail(f"image_id {_vqa_image_id(a)} differs from {image_id} in {path.name}")
        records.append(QARecord(
            question_id=q.question_id(), scene_id=None, question=q.text("question"), answers=_vqa_answers(a),
            qtype=_vqa_answer_type(a),
            extra={"image": str(coco.find(q, image_id)), "image_id": image_id, "answer_format": "vqa",
                   **{key: a.text(key) for key in ("question_type", "multiple_choice_answer") if a.has(key)}},
        ))
    return _check_unique(records, path)


def _vqa_file(path: Path, what: str, key: str) -> tuple[dict, list[tuple[str, object]]]:
    """(the file's other top-level fields, its records): records from data[key] of a JSON object, or the JSON list."""
    data = _read_json(path, what)
    if isinstance(data, dict):
        if not isinstance(data.get(key), list):
            found = "missing" if key not in data else type(data[key]).__name__
            raise DatasetFormatError(f"{path}: expected a JSON object with a {key!r} list (or a JSON list of "
                                     f"records); {key!r} is {found}")
        return {k: v for k, v in data.items() if k != key}, [(f"record {i}", r) for i, r in enumerate(data[key])]
    if isinstance(data, list):
        return {}, [(f"record {i}", r) for i, r in enumerate(data)]
    raise DatasetFormatError(f"{path}: expected a JSON object with a {key!r} list, got {type(data).__name__}")


def _vqa_image_id(r: _Record) -> int:
    value = r.get("image_id")
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        r.fail(f"field 'image_id' is {value!r}, expected a COCO image id (a non-negative integer)")
    return value


def _vqa_answers(a: _Record) -> list[str]:
    value = a.get("answers")
    if not isinstance(value, list) or not all(isinstance(x, dict) and isinstance(x.get("answer"), str) for x in value):
        a.fail(f"field 'answers' is {value!r}, expected a list of {{answer, answer_confidence, answer_id}} objects "
               "with a string 'answer'")
    if len(value) != VQA_NUM_ANSWERS:
        # VQA accuracy leaves out each answer in turn and needs three matches among the rest: defined on ten
        a.fail(f"field 'answers' holds {len(value)} answers; VQAv2 gives every question {VQA_NUM_ANSWERS} human "
               "answers, and VQA accuracy is defined over those ten")
    return [x["answer"] for x in value]


def _vqa_answer_type(a: _Record) -> str:
    value = a.get("answer_type")
    if value not in VQA_ANSWER_TYPES:
        a.fail(f"field 'answer_type' is {value!r}, expected one of {', '.join(map(repr, VQA_ANSWER_TYPES))}")
    return value


class _CocoImages:
    """A COCO image's file by image id, in one folder: COCO_{split}_{id:012d}.jpg when the questions file names
    its split (data_subtype), else (or when that file is absent) {id:012d}.jpg, else COCO_<any split>_{id:012d}.jpg.
    The folder is listed at most once, and only when a name has to be searched for (it holds ~40,000 images)."""

    _COCO_NAME = re.compile(r"COCO_.+_(\d{12})\.jpg")

    def __init__(self, folder: Path, split: str | None):
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder not found: {folder}; pass {VQA_IMAGES_HINT}")
        self.folder, self.split = folder.resolve(), split
        self._listing: dict[int, list[str]] | None = None

    def find(self, q: _Record, image_id: int) -> Path:
        tried = [f"COCO_{self.split}_{image_id:012d}.jpg"] if self.split else []
        tried.append(f"{image_id:012d}.jpg")
        for name in tried:
            if (self.folder / name).is_file():
                return self.folder / name
        found = self._by_id().get(image_id, [])
        if len(found) > 1:
            q.fail(f"image_id {image_id} matches {len(found)} files in {self.folder}: {', '.join(sorted(found))}; "
                   "keep one split's images in the folder")
        if not found:
            q.fail(f"no image for image_id {image_id} in {self.folder}: looked for {', '.join(tried)} and "
                   f"COCO_*_{image_id:012d}.jpg; pass {VQA_IMAGES_HINT}")
        return self.folder / found[0]

    def _by_id(self) -> dict[int, list[str]]:
        if self._listing is None:
            self._listing = {}
            for entry in os.scandir(self.folder):
                match = self._COCO_NAME.fullmatch(entry.name)
                if match and entry.is_file():
                    self._listing.setdefault(int(match.group(1)), []).append(entry.name)
        return self._listing


# --- TextVQA -------------------------------------------------------------------------------
TEXTVQA_NAME = "textvqa"  # the official files' dataset_name
# LLaVA's layout (haotian-liu/LLaVA docs/Evaluation.md, scripts/v1_5/eval/textvqa.sh): the annotation file and
# the unpacked train_val_images.zip side by side, playground/data/eval/textvqa/{TextVQA_0.5.1_val.json,train_images}.
TEXTVQA_IMAGES = "train_images"
TEXTVQA_IMAGES_HINT = (f"the images ({{image_id}}.jpg) are read from {TEXTVQA_IMAGES}/ beside the annotation file "
                       f"(train_val_images.zip unpacks to {TEXTVQA_IMAGES}/, which holds the train and the val "
                       "images), or from the folder passed as images=FOLDER")
TEXTVQA_FILE = "TextVQA annotation file (e.g. TextVQA_0.5.1_val.json)"


def load_textvqa(path: str | Path, images: str | Path | None = None) -> list[QARecord]:
    """TextVQA in the official format: TextVQA_0.5.1_{train,val}.json, {"dataset_type": "val", "dataset_name":
    "textvqa", "dataset_version", "data": [{question_id, question, image_id, answers: [str] x 10, image_classes,
    image_width, image_height, flickr_original_url, flickr_300k_url, question_tokens, set_name}]}, and the
    images `{image_id}.jpg` in `images=` (default: train_images/ beside the file, LLaVA's layout).

    Records follow the file. answers are the ten human answers as written; qtype is None (TextVQA has no answer
    types); extra["image"] is the image's resolved path and extra["answer_format"] "vqa", which makes
    score_records add VQA accuracy, TextVQA's metric. The test split has no answers and is refused.
    """
    path = Path(path)
    data = _read_json(path, TEXTVQA_FILE)
    rows = _textvqa_rows(path, data)
    folder = Path(images) if images is not None else path.parent / TEXTVQA_IMAGES
    if not folder.is_dir():
        raise FileNotFoundError(f"TextVQA image folder not found: {folder}; {TEXTVQA_IMAGES_HINT}")
    folder = folder.resolve()

    def build(r: _Record) -> QARecord:
        if not r.has("answers"):
            # The test split's records carry no answers (they are scored on EvalAI only): nothing to score here.
            r.fail("no 'answers' field: TextVQA's test split (TextVQA_0.5.1_test.json) has no public answers and "
                   "cannot be scored here; use TextVQA_0.5.1_val.json (or the train file)")
        answers = r.answers()
        if len(answers) != VQA_NUM_ANSWERS:
            # VQA accuracy leaves each answer out in turn and needs three matches among the rest: defined on ten
            r.fail(f"field 'answers' holds {len(answers)} answers; TextVQA gives every question {VQA_NUM_ANSWERS} "
                   "human answers, and VQA accuracy is defined over those ten")
        image_id = r.text("image_id")
        # the id names the file {image_id}.jpg in the folder; a path separator would point outside it
        if not image_id or Path(image_id).name != image_id:
            r.fail(f"field 'image_id' is {image_id!r}, expected an image id such as '0054c91397f2fe05' "
                   "(the image is {image_id}.jpg)")
        image = folder / f"{image_id}.jpg"
        if not image.is_file():
            r.fail(f"no image for image_id {image_id!r}: {image} not found; {TEXTVQA_IMAGES_HINT}")
        return QARecord(
            question_id=r.question_id(), scene_id=None, question=r.text("question"), answers=answers,
            extra={"image": str(image), "image_id": image_id, "answer_format": "vqa",
                   **{key: r.data[key] for key in ("image_classes", "set_name") if r.has(key)}},
        )

    return _records(path, rows, build)


def _textvqa_rows(path: Path, data: object) -> list[tuple[str, object]]:
    """The (location, record) rows of a parsed TextVQA file, after checking that it is one: an object with a
    'data' list whose dataset_name (when the file names one) is textvqa and whose dataset_type is not test."""
    expected = f'a JSON object {{"dataset_name": "{TEXTVQA_NAME}", "data": [...]}}, as in TextVQA_0.5.1_val.json'
    if not isinstance(data, dict):
        raise DatasetFormatError(f"{path}: not a TextVQA file: found a JSON {type(data).__name__}, expected {expected}")
    if not isinstance(data.get("data"), list):
        found = "a 'data' of type " + type(data["data"]).__name__ if "data" in data else "no 'data' list"
        raise DatasetFormatError(f"{path}: not a TextVQA file: found {found} (top-level fields: "
                                 f"{', '.join(sorted(data)) or 'none'}), expected {expected}")
    name = data.get("dataset_name")
    # TextCaps files share this layout; their dataset_name tells them apart
    if name is not None and name != TEXTVQA_NAME:
        raise DatasetFormatError(f"{path}: not a TextVQA file: dataset_name is {name!r}, expected {TEXTVQA_NAME!r}")
    if data.get("dataset_type") == "test":
        raise DatasetFormatError(f"{path}: dataset_type is 'test': TextVQA's test split has no public answers and "
                                 "cannot be scored here; use TextVQA_0.5.1_val.json (or the train file)")
    return [(f"record {i}", record) for i, record in enumerate(data["data"])]


def _scanrefer_rows(path: Path, boxes: str | Path | None) -> list[tuple[_Record, list]]:
    """ScanRefer-format records (scene_id, object_id, object_name, ann_id, description) with each one's box:
    inline as "bbox" (8 corners, the benchmark files) or "box" (6 numbers), or from `boxes`, a JSON object
    {"<scene_id>|<object_id>": box}."""
    table = None
    if boxes is not None:
        table = _read_json(Path(boxes), 'box file (a JSON object {"<scene_id>|<object_id>": box})')
        if not isinstance(table, dict):
            raise DatasetFormatError(f"{boxes}: expected a JSON object mapping '<scene_id>|<object_id>' to a box")
    rows = []
    for location, data in _read_records(path, "ScanRefer-format file (e.g. ScanRefer_filtered_val.json)"):
        r = _Record(path, location, data)
        key = f"{r.text('scene_id')}|{r.question_id('object_id')}"
        box = r.get("bbox") if r.has("bbox") else r.get("box") if r.has("box") else None
        if box is None and table is not None:
            box = table.get(key)
        if box is None:
            r.fail(f"no box for object {key!r}: give each record a 'bbox' (8 corners) or 'box' (cx, cy, cz, "
                   "dx, dy, dz), or pass boxes=<JSON file mapping '<scene_id>|<object_id>' to a box>")
        try:
            as_box(box)
        except ValueError as exc:
            r.fail(f"box of object {key!r}: {exc}")
        rows.append((r, box))
    return rows


def load_scanrefer(path: str | Path, boxes: str | Path | None = None) -> list[QARecord]:
    """ScanRefer (3D grounding): one record per referring expression, id "<scene_id>-<object_id>_<ann_id>" as
    ScanRefer names them; the question asks where the described object is, the answer is its box as text and
    extra["box"] the box itself, extra["subset"] "unique" or "multiple" (eval.boxes.unique_multiple)."""
    path = Path(path)
    rows = _scanrefer_rows(path, boxes)
    subsets = unique_multiple([r.data for r, _ in rows])
    records = []
    for (r, box), subset in zip(rows, subsets):
        description = r.text("description")
        records.append(QARecord(
            question_id=f"{r.text('scene_id')}-{r.question_id('object_id')}_{r.question_id('ann_id')}",
            scene_id=r.text("scene_id"), question=f"Where is the object described here? {description}",
            answers=[_box_text(box)], qtype="grounding",
            extra={"box": box, "subset": subset, "object_id": r.question_id("object_id"),
                   "object_name": r.text("object_name"), "description": description},
        ))
    return _check_unique(records, path)


def load_scan2cap(path: str | Path, boxes: str | Path | None = None) -> list[QARecord]:
    """Scan2Cap (dense captioning) from ScanRefer-format annotations: one record per object, id
    "<scene_id>|<object_id>", every description of the object a reference (Scan2Cap, lib/eval_helper.py:46-52),
    extra["box"] its box."""
    path = Path(path)
    objects: dict[str, tuple[_Record, list, list[str]]] = {}
    for r, box in _scanrefer_rows(path, boxes):
        key = f"{r.text('scene_id')}|{r.question_id('object_id')}"
        objects.setdefault(key, (r, box, []))[2].append(r.text("description"))
    return [QARecord(question_id=key, scene_id=r.text("scene_id"), question=f"Describe the object at {_box_text(box)}.",
                     answers=descriptions, qtype="captioning",
                     extra={"box": box, "object_id": r.question_id("object_id"), "object_name": r.text("object_name")})
            for key, (r, box, descriptions) in objects.items()]


def load_llava3d_scan2cap(path: str | Path) -> list[QARecord]:
    """LLaVA-3D's captioning eval file (llava-3d-scan2cap_val.json, read by its llava/eval/model_scan2cap.py:44-69):
    records {id, video, target: {boxes: [[cx, cy, cz, dx, dy, dz, ...]]}, conversations: [question, answer]}."""
    path = Path(path)

    def build(r: _Record) -> QARecord:
        target, turns = r.get("target"), r.get("conversations")
        if not isinstance(target, dict) or not isinstance(target.get("boxes"), list) or not target["boxes"]:
            r.fail(f"field 'target' is {target!r}, expected {{'boxes': [[cx, cy, cz, dx, dy, dz], ...]}}")
        if not isinstance(turns, list) or len(turns) < 2 or not all(isinstance(t, dict) and isinstance(
                t.get("value"), str) for t in turns[:2]):
            r.fail("field 'conversations' must hold the question and the answer as {'value': text} turns")
        box = target["boxes"][0][:6]
        try:
            as_box(box)
        except ValueError as exc:
            r.fail(f"target box: {exc}")
        video = r.text("video")
        return QARecord(question_id=r.question_id("id"), scene_id=video.rsplit("/", 1)[-1],
                        question=turns[0]["value"], answers=[turns[1]["value"]], qtype="captioning",
                        extra={"box": box, "video": video})

    return _records(path, _read_json_or_jsonl(path, "LLaVA-3D Scan2Cap file (llava-3d-scan2cap_val.json)"), build)


def _box_text(box) -> str:
    """A box as the text LLaVA-3D's docs write it: [cx, cy, cz, dx, dy, dz], 2 decimals."""
    low, high = as_box(box)
    return "[" + ", ".join(f"{v:.2f}" for v in (*(low + high) / 2, *(high - low))) + "]"


# name -> loader(path, **options).
LOADERS: dict[str, Callable[..., list[QARecord]]] = {
    "scanqa": load_scanqa,
    "sqa3d": load_sqa3d,
    "llava3d": load_llava3d,
    "jsonl": load_jsonl,
    "scanrefer": load_scanrefer,
    "scan2cap": load_scan2cap,
    "llava3d-scan2cap": load_llava3d_scan2cap,
    "vqav2": load_vqav2,
    "textvqa": load_textvqa,
}  # the testbed adds "testbed" when imported (adatoken.testbed.answerer)


def register_loader(name: str, loader: Callable[..., list[QARecord]]) -> None:
    LOADERS[name] = loader


def load_plugins() -> None:
    """Import the modules installed packages list under the "adatoken.eval" entry points (the testbed's
    among them): each registers its question sets and answerers when imported."""
    from importlib.metadata import entry_points

    for entry in entry_points(group="adatoken.eval"):
        entry.load()


def load_dataset(name: str, path: str | Path, **options) -> list[QARecord]:
    """Load an evaluation set by format name, e.g. load_dataset("sqa3d", "sqa_task/balanced", split="test")."""
    if name not in LOADERS:
        load_plugins()
    if name not in LOADERS:
        raise ValueError(f"unknown dataset format {name!r}; valid: {', '.join(LOADERS)}")
    return LOADERS[name](path, **options)
