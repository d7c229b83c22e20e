"""3D box IoU, grounding Acc@k and Scan2Cap-style captioning scores by hand; the ScanRefer / Scan2Cap loaders."""
import json

import pytest

from adatoken.eval import load_dataset
from adatoken.eval.boxes import (
    as_box,
    box_iou,
    captioning_scores,
    generalized_iou,
    grounding_scores,
    match_boxes,
    parse_box,
    unique_multiple,
    without_boxes,
)
from adatoken.eval.datasets import DatasetFormatError

UNIT = [0.5, 0.5, 0.5, 1, 1, 1]  # the cube [0, 1]^3 as centre and size


def corners(low, high):
    return [[x, y, z] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])]


@pytest.mark.parametrize("other,expected", [
    (UNIT, 1.0),                                        # identical
    ([3, 3, 3, 1, 1, 1], 0.0),                          # disjoint
    ([1.5, 0.5, 0.5, 1, 1, 1], 0.0),                    # touching along a face: no volume in common
    ([1.0, 0.5, 0.5, 1, 1, 1], 1 / 3),                  # half of each: 0.5 / 1.5
    ([0.5, 0.5, 0.5, 2, 2, 2], 1 / 8),                  # nested in a cube of 8
    ([0.5, 0.5, 0.5, 0, 1, 1], 0.0),                    # degenerate (no volume)
    (corners([0, 0, 0], [1, 1, 0.5]), 0.5),             # 8 corners, the lower half
])
def test_box_iou_by_hand(other, expected):
    assert box_iou(UNIT, other) == pytest.approx(expected, abs=1e-7)
    assert box_iou(other, UNIT) == pytest.approx(expected, abs=1e-7)


def test_boxes_are_checked():
    assert as_box(corners([0, 0, 0], [1, 2, 3])).tolist() == [[0, 0, 0], [1, 2, 3]]
    with pytest.raises(ValueError, match="6 numbers .* or 8 corners"):
        as_box([1, 2, 3])
    with pytest.raises(ValueError, match="must not be negative"):
        as_box([0, 0, 0, -1, 1, 1])
    assert generalized_iou(UNIT, [2.5, 0.5, 0.5, 1, 1, 1]) == pytest.approx(-1 / 3)  # enclosing 3, union 2


def test_grounding_accuracy_overall_and_by_subset():
    truth = [UNIT] * 4
    predicted = [UNIT, [1.0, 0.5, 0.5, 1, 1, 1], [0.5, 0.5, 0.5, 2, 2, 2], None]  # IoU 1, 1/3, 1/8, none
    scores = grounding_scores(predicted, truth, subsets=["unique", "multiple", "multiple", "unique"])
    assert (scores["acc@0.25"], scores["acc@0.5"]) == (0.5, 0.25)
    assert scores["by_subset"]["unique"] == {"n": 2, "acc@0.25": 0.5, "acc@0.5": 0.5}
    assert scores["by_subset"]["multiple"] == {"n": 2, "acc@0.25": 0.5, "acc@0.5": 0.0}
    with pytest.raises(ValueError, match="one predicted box per true box"):
        grounding_scores([UNIT], truth)


def test_unique_multiple_counts_annotated_objects_of_a_class():
    records = [{"scene_id": "s0", "object_id": "1", "object_name": "office_chair"},
               {"scene_id": "s0", "object_id": "1", "object_name": "office_chair"},  # a second description
               {"scene_id": "s0", "object_id": "2", "object_name": "office chair"},
               {"scene_id": "s0", "object_id": "3", "object_name": "table"},
               {"scene_id": "s1", "object_id": "1", "object_name": "office_chair"}]
    assert unique_multiple(records) == ["multiple", "multiple", "multiple", "unique", "unique"]


def test_parse_box_and_match_boxes():
    assert parse_box("It is localized at [1.0, -2, 0.5, 1e-1, .3, 2].") == [1.0, -2.0, 0.5, 0.1, 0.3, 2.0]
    assert parse_box("somewhere near the bed") is None
    assert without_boxes("a red chair [1.0, -2, 0.5, 1e-1, .3, 2] by the bed") == "a red chair by the bed"
    far = [5.5, 0.5, 0.5, 1, 1, 1]
    assert match_boxes([far, UNIT], [UNIT, far]) == [1, 0]
    assert match_boxes([], [UNIT]) == [None]


def test_captioning_counts_a_caption_only_where_its_box_matches():
    captions = ["a brown wooden chair next to the table", "a blue lamp on the desk"]
    references = [["a brown wooden chair next to the table"], ["a large white bed in the corner of the room"]]
    scores = captioning_scores(captions, references, ious=[0.6, 0.3], meteor=False)
    # object 0 is its reference word for word: BLEU-4 1; object 1 shares no 4-gram with its reference: ~0
    assert scores["bleu_4@0.5"] == pytest.approx(0.5, abs=1e-6)     # (1 + 0·[0.3 >= 0.5]) / 2 objects
    assert scores["bleu_4@0.25"] == pytest.approx(0.5, abs=1e-6)    # (1 + ~0) / 2
    cider = scores["per_object"]["cider"]
    assert scores["cider@0.5"] == pytest.approx(cider[0] / 2) and cider[0] > cider[1]
    assert scores["cider@0.25"] == pytest.approx((cider[0] + cider[1]) / 2)
    assert scores["meteor@0.5"] is None and "meteor" in scores["unavailable"]


def test_scanrefer_and_scan2cap_loaders(tmp_path):
    rows = [{"scene_id": "scene0000_00", "object_id": "3", "object_name": "chair", "ann_id": "0",
             "description": "the chair by the window.", "box": [1, 2, 0.5, 0.6, 0.6, 1.0]},
            {"scene_id": "scene0000_00", "object_id": "3", "object_name": "chair", "ann_id": "1",
             "description": "a grey chair.", "box": [1, 2, 0.5, 0.6, 0.6, 1.0]},
            {"scene_id": "scene0000_00", "object_id": "7", "object_name": "table", "ann_id": "0",
             "description": "the table.", "bbox": corners([0, 0, 0], [2, 1, 0.8])}]
    path = tmp_path / "ScanRefer_filtered_val.json"
    path.write_text(json.dumps(rows))
    grounding = load_dataset("scanrefer", path)
    assert [r.question_id for r in grounding] == ["scene0000_00-3_0", "scene0000_00-3_1", "scene0000_00-7_0"]
    assert grounding[0].extra["subset"] == "unique" and grounding[0].answers == ["[1.00, 2.00, 0.50, 0.60, 0.60, 1.00]"]
    captioning = load_dataset("scan2cap", path)
    assert [(r.question_id, r.answers) for r in captioning] == [
        ("scene0000_00|3", ["the chair by the window.", "a grey chair."]), ("scene0000_00|7", ["the table."])]

    del rows[0]["box"]
    path.write_text(json.dumps(rows))
    with pytest.raises(DatasetFormatError, match=r"record 0: no box for object 'scene0000_00\|3'"):
        load_dataset("scanrefer", path)
    table = tmp_path / "boxes.json"
    table.write_text(json.dumps({"scene0000_00|3": [1, 2, 0.5, 0.6, 0.6, 1.0]}))
    assert load_dataset("scanrefer", path, boxes=table)[0].extra["box"] == [1, 2, 0.5, 0.6, 0.6, 1.0]
    rows[1]["box"] = [1, 2]
    path.write_text(json.dumps(rows))
    with pytest.raises(DatasetFormatError, match="record 1: box of object .* 6 numbers"):
        load_dataset("scanrefer", path, boxes=table)


def test_llava3d_scan2cap_loader(tmp_path):
    record = {"id": "scene0011_00_7", "video": "scannet/scene0011_00",
              "target": {"boxes": [[1.0, 2.0, 0.5, 0.4, 0.4, 0.9]]},
              "conversations": [{"from": "human", "value": "<video>\\nDescribe the object at <boxes>."},
                                {"from": "gpt", "value": "A brown chair at the table."}]}
    path = tmp_path / "llava-3d-scan2cap_val.json"
    path.write_text(json.dumps([record]))
    [loaded] = load_dataset("llava3d-scan2cap", path)
    assert (loaded.scene_id, loaded.answers, loaded.extra["box"]) == (
        "scene0011_00", ["A brown chair at the table."], [1.0, 2.0, 0.5, 0.4, 0.4, 0.9])
    record["target"] = {"boxes": []}
    path.write_text(json.dumps([record]))
    with pytest.raises(DatasetFormatError, match="field 'target'"):
        load_dataset("llava3d-scan2cap", path)
