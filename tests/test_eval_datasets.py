"""adatoken.eval.datasets: each loader on a hand-written fixture in its real format, and the errors
it raises on broken copies of that fixture."""
import json
import re
import shutil
from pathlib import Path

import pytest

from adatoken.eval.datasets import (
    LOADERS,
    DatasetFormatError,
    load_dataset,
    load_jsonl,
    load_llava3d,
    load_scanqa,
    load_sqa3d,
)

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
SQA3D_QUESTIONS = "v1_balanced_questions_test_scannetv2.json"
SQA3D_ANNOTATIONS = "v1_balanced_sqa_annotations_test_scannetv2.json"


def _edit_json(source: Path, target: Path, edit) -> Path:
    """Copy a JSON fixture to `target` with `edit(data)` applied."""
    data = json.loads(source.read_text())
    edit(data)
    target.write_text(json.dumps(data))
    return target


def test_scanqa():
    records = load_scanqa(FIXTURES / "ScanQA_v1.0_val.json")
    assert [r.question_id for r in records] == ["val-scene0011-0", "val-scene0011-1", "val-scene0015-0"]
    first = records[0]
    assert first.scene_id == "scene0011_00"
    assert first.question == "What color is the chair in the kitchen?"
    assert first.answers == ["dark brown", "brown"]
    assert first.qtype is None and first.situation is None
    assert first.extra == {"object_ids": [2, 3], "object_names": ["chair", "chair"]}


def test_sqa3d_joins_questions_and_annotations():
    records = load_sqa3d(FIXTURES / "sqa3d", split="test")
    assert [r.question_id for r in records] == ["220602000002", "220602000029", "220602000042"]
    first = records[0]
    assert first.scene_id == "scene0050_00"
    assert first.question == "What instrument in front of me is ebony and ivory?"
    assert first.situation.startswith("I am standing by the ottoman")
    assert first.answers == ["piano"]
    assert [r.qtype for r in records] == ["what", "can", "how"]
    assert first.extra["position"]["x"] == pytest.approx(0.7110268899979686)
    assert first.extra["alternative_situation"] == ["I just placed two backpacks on the ottoman on my right side."]
    assert first.extra["question_type"] == "N/A"


def test_llava3d_scanqa_files():
    records = load_llava3d(FIXTURES / "llava3d" / "llava-3d-scanqa_val_question.json",
                           answers=FIXTURES / "llava3d" / "llava3d_scanqa_val_answer.json")
    # The answers file has a third question that the question file lacks: ignored.
    assert [r.question_id for r in records] == ["val-scene0011-0", "val-scene0011-1"]
    assert records[0].scene_id == "scene0011_00"  # from "video": "scannet/scene0011_00"
    assert records[0].answers == ["dark brown", "brown"]
    assert records[0].question.endswith("Answer the question using a single word or phrase.")
    assert records[0].qtype is None
    assert records[0].extra == {"video": "scannet/scene0011_00"}


def test_llava3d_sqa3d_files_with_jsonl_answers():
    records = load_llava3d(FIXTURES / "llava3d" / "llava-3d-sqa3d_test_question.json",
                           answers=FIXTURES / "llava3d" / "llava3d_sqa3d_test_answer.jsonl")
    assert [(r.question_id, r.answers, r.qtype) for r in records] == [
        ("220602000002", ["piano"], "what"), ("220602000029", ["no"], "can")]


def test_llava3d_answers_inside_the_question_file(tmp_path):
    questions = [{"question_id": "000001", "scene_id": "scene0011_00", "text": "What color?",
                  "answers": ["brown"], "video": "scene0011_00", "type": "0"}]
    path = tmp_path / "questions.json"
    path.write_text(json.dumps(questions))
    [record] = load_llava3d(path)
    assert (record.answers, record.qtype, record.scene_id) == (["brown"], "what", "scene0011_00")


def test_jsonl():
    records = load_jsonl(FIXTURES / "qa.jsonl")  # the blank line between records is skipped
    assert [r.question_id for r in records] == ["q1", "q2"]
    assert records[0].scene_id == "scene0011_00" and records[0].qtype is None
    assert (records[1].qtype, records[1].situation) == ("is", "I am facing the door.")
    assert records[1].extra == {"source": "hand-written"}


def test_load_dataset_by_name():
    import adatoken.testbed  # noqa: F401  (the testbed registers its own loader)

    assert set(LOADERS) == {"scanqa", "sqa3d", "llava3d", "jsonl", "scanrefer", "scan2cap", "llava3d-scan2cap",
                            "vqav2", "textvqa", "testbed", "testbed-grounding", "testbed-captioning"}
    assert len(load_dataset("sqa3d", FIXTURES / "sqa3d", split="test")) == 3
    with pytest.raises(ValueError, match="valid: scanqa, sqa3d, llava3d, jsonl, scanrefer, scan2cap, llava3d-scan2cap, "
                                         "vqav2, textvqa"):
        load_dataset("referit3d", FIXTURES)


# --- errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("loader", [load_scanqa, load_jsonl, load_llava3d])
def test_missing_file(loader, tmp_path):
    missing = tmp_path / "absent.json"
    with pytest.raises(FileNotFoundError, match=re.escape(f"not found: {missing}")):
        loader(missing)


def test_llava3d_missing_answers_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"LLaVA-3D answers file not found: {tmp_path / 'a.json'}")):
        load_llava3d(FIXTURES / "llava3d" / "llava-3d-scanqa_val_question.json", answers=tmp_path / "a.json")


def test_sqa3d_missing_directory_or_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="SQA3D directory not found"):
        load_sqa3d(tmp_path / "absent")
    shutil.copy(FIXTURES / "sqa3d" / SQA3D_QUESTIONS, tmp_path)
    with pytest.raises(FileNotFoundError, match=SQA3D_ANNOTATIONS):
        load_sqa3d(tmp_path, split="test")
    with pytest.raises(ValueError, match="valid: train, val, test"):
        load_sqa3d(tmp_path, split="dev")


@pytest.mark.parametrize("field", ["question_id", "scene_id", "question", "answers"])
def test_scanqa_missing_field(field, tmp_path):
    path = _edit_json(FIXTURES / "ScanQA_v1.0_val.json", tmp_path / "ScanQA_v1.0_val.json",
                      lambda data: data[1].pop(field))
    with pytest.raises(DatasetFormatError, match=f"record 1.*missing field '{field}'") as error:
        load_scanqa(path)
    assert str(path) in str(error.value)
    if field != "question_id":
        assert "'val-scene0011-1'" in str(error.value)


@pytest.mark.parametrize("bad_answers", [[], "brown", [1]])
def test_scanqa_bad_answers(bad_answers, tmp_path):
    path = _edit_json(FIXTURES / "ScanQA_v1.0_val.json", tmp_path / "val.json",
                      lambda data: data[0].update(answers=bad_answers))
    with pytest.raises(DatasetFormatError, match="record 0 .*expected a non-empty list of strings"):
        load_scanqa(path)


def test_malformed_json_names_file_and_line():
    path = FIXTURES / "malformed.json"
    with pytest.raises(DatasetFormatError, match=re.escape(f"{path}: not valid JSON") + ".* line 3"):
        load_scanqa(path)


def test_malformed_jsonl_names_file_and_line():
    path = FIXTURES / "malformed.jsonl"
    with pytest.raises(DatasetFormatError, match=re.escape(f"{path}: line 2 is not valid JSON")):
        load_jsonl(path)


def test_record_that_is_not_an_object(tmp_path):
    path = tmp_path / "val.json"
    path.write_text('[["val-scene0011-0", "What?"]]')
    with pytest.raises(DatasetFormatError, match="record 0: expected a JSON object, got list"):
        load_scanqa(path)


def test_duplicate_question_ids(tmp_path):
    path = _edit_json(FIXTURES / "ScanQA_v1.0_val.json", tmp_path / "val.json",
                      lambda data: data.append(data[0]))
    with pytest.raises(DatasetFormatError, match="record 3: question_id 'val-scene0011-0' appears more than once"):
        load_scanqa(path)


def _sqa3d_copy(tmp_path, edit_questions=lambda data: None, edit_annotations=lambda data: None) -> Path:
    _edit_json(FIXTURES / "sqa3d" / SQA3D_QUESTIONS, tmp_path / SQA3D_QUESTIONS, edit_questions)
    _edit_json(FIXTURES / "sqa3d" / SQA3D_ANNOTATIONS, tmp_path / SQA3D_ANNOTATIONS, edit_annotations)
    return tmp_path


@pytest.mark.parametrize("edits, message", [
    (dict(edit_questions=lambda d: d["questions"][2].pop("situation")),
     rf"{SQA3D_QUESTIONS}: record 2 \(question_id 220602000042\): missing field 'situation'"),
    (dict(edit_annotations=lambda d: d["annotations"][0]["answers"][0].pop("answer")),
     rf"{SQA3D_ANNOTATIONS}: record 0 .*not an object with a string 'answer'"),
    (dict(edit_annotations=lambda d: d["annotations"][1].update(question_id=1)),
     rf"{SQA3D_ANNOTATIONS}: record 1 \(question_id 1\): no question with this id"),
    (dict(edit_annotations=lambda d: d["annotations"].pop()),
     rf"{SQA3D_QUESTIONS}: 1 questions have no annotation .*'220602000042'"),
    (dict(edit_annotations=lambda d: d["annotations"][2].update(scene_id="scene0000_00")),
     r"record 2 .*scene_id 'scene0000_00' differs from 'scene0084_00'"),
    (dict(edit_questions=lambda d: d.pop("questions")),
     rf"{SQA3D_QUESTIONS}: expected a JSON object with a 'questions' list"),
])
def test_sqa3d_broken(edits, message, tmp_path):
    with pytest.raises(DatasetFormatError, match=message):
        load_sqa3d(_sqa3d_copy(tmp_path, **edits), split="test")


@pytest.mark.parametrize("edit_questions, edit_answers, message", [
    (lambda d: d[1].update(question_id="val-scene9999-0"), None,
     r"record 1 \(question_id 'val-scene9999-0'\): no answer with this id in llava3d_scanqa_val_answer.json"),
    (lambda d: d[0].pop("video"), None, "missing both 'scene_id' and 'video'"),
    (lambda d: d[0].pop("text"), None, "missing field 'text'"),
    (None, lambda d: d[0].update(type=6), r"field 'type' is 6, expected an integer 0..5 \(0=what"),
    (None, lambda d: d[1].update(text=[]), "field 'text' is \\[\\], expected a non-empty list of strings"),
])
def test_llava3d_broken(edit_questions, edit_answers, message, tmp_path):
    questions = _edit_json(FIXTURES / "llava3d" / "llava-3d-scanqa_val_question.json",
                           tmp_path / "llava-3d-scanqa_val_question.json", edit_questions or (lambda d: None))
    answers = _edit_json(FIXTURES / "llava3d" / "llava3d_scanqa_val_answer.json",
                         tmp_path / "llava3d_scanqa_val_answer.json", edit_answers or (lambda d: None))
    with pytest.raises(DatasetFormatError, match=message):
        load_llava3d(questions, answers=answers)


def test_llava3d_questions_without_answers_file_need_answers():
    with pytest.raises(DatasetFormatError, match="record 0 .*no 'answers' field and no answers file given"):
        load_llava3d(FIXTURES / "llava3d" / "llava-3d-scanqa_val_question.json")


def test_jsonl_missing_field_names_the_line(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question_id": "q1", "question": "What?", "answers": ["a"]}\n'
                    '{"question_id": "q2", "answers": ["b"]}\n')
    with pytest.raises(DatasetFormatError, match=r"qa.jsonl: line 2 \(question_id 'q2'\): missing field 'question'"):
        load_jsonl(path)
