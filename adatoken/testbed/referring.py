"""The testbed's 3D grounding and dense captioning tasks, in the style of ScanRefer and Scan2Cap (the paper's Table I).

- grounding: "Where is the {referring expression}?" answered with the location word and four coordinate words,
  "loc cz dx dy dz" (the height of the box's centre and its size, in decimetres: "loc 4 5 5 9"); the location
  word's hidden state points at the object's spatial tokens, whose points give the x-y centre (locator.py). Older
  checkpoints answer all six, "cx cy cz dx dy dz", which box_from_words reads too. An expression names one object: its
  class when the scene has one of them ("the bed"), class and colour when only one of its class has that colour
  ("the red chair"), or class and the unique object it is closest to ("the chair closest to the bed", which must
  win by RELATION_MARGIN over every other object of its class).
- dense captioning: "Describe the clicked object." with a click at the object's centre, answered with a templated
  caption, "{colour} {class}" and, where one object of another class is clearly nearest, "next to the {class}".
  The click is the word CLICK whose embedding also carries the point's 3D position embedding (model.py), as
  LLaVA-3D encodes a click prompt with the 3D position encoding its spatial tokens have: the model finds the object
  by matching positions, which it already does for spatial tokens.

Why a location word: the first design wrote the whole box as words, so that one text path scored and pruned
everything. Two fine-tunes (1,000 steps) taught the model sizes and heights to a few centimetres but x-y centres
only to about 0.3 m, while Acc@0.25 needs about 0.1 m (benchmarks/grounding_ceiling.py); LLaVA-3D, for the same
reason, grounds with a decoder on a <LOC> token. The answer still goes through `generate`: the model rewrites a
location answer to the six words (model.TestbedModel.answer), so the runner scores it like any other. Centre and
size rather than corners: the centre is where an object is and the size mostly what its class is. Decimetres over
whole rooms take 71 words (0..70); rounding a true box to them keeps Acc@0.5 at 0.89 on the test set.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from adatoken.testbed.questions import RELATION_MARGIN, Question, closest_object, point_box_distance, unique_classes
from adatoken.testbed.scenes import CLASS_NAMES, Scene

TASKS_3D = ("grounding", "captioning")
COORDINATE_STEP = 0.1  # metres per coordinate word
COORDINATE_WORDS = tuple(str(i) for i in range(71))  # 0 .. 7.0 m: the largest room is 7 m wide
WHERE = "Where is the {x}?"
LOCATION = "loc"  # a grounding answer's first word, whose hidden state the locator reads (LLaVA-3D's <LOC>)
CLICK = "clicked"  # the word that carries a click's position (model.TestbedModel.embed)
DESCRIBE_CLICKED = f"Describe the {CLICK} object."
CLOSEST_TO = "{x} closest to the {y}"
NEXT_TO = "{c} next to the {y}"


def coordinates(values: Sequence[float]) -> str:
    """Metres as coordinate words: "3.24, 1.5" -> "32 15" (clipped to the words there are)."""
    steps = np.clip(np.rint(np.asarray(values, dtype=float) / COORDINATE_STEP), 0, len(COORDINATE_WORDS) - 1)
    return " ".join(COORDINATE_WORDS[int(s)] for s in steps)


def box_words(box: Sequence[float]) -> str:
    """A scene box (xmin, ymin, zmin, xmax, ymax, zmax in metres) as the grounding answer: centre, then size."""
    low, high = np.asarray(box[:3], dtype=float), np.asarray(box[3:], dtype=float)
    return coordinates([*(low + high) / 2, *(high - low)])


def location_words(box: Sequence[float]) -> str:
    """A scene box as the grounding answer: the location word, then the centre's height and the size."""
    low, high = np.asarray(box[:3], dtype=float), np.asarray(box[3:], dtype=float)
    return f"{LOCATION} " + coordinates([(low[2] + high[2]) / 2, *(high - low)])


def box_from_words(text: str) -> list[float] | None:
    """A grounding answer back to a box as eval.boxes reads one ([cx, cy, cz, dx, dy, dz] in metres); None unless
    the answer is exactly six coordinate words."""
    words = text.split()
    if len(words) != 6 or not all(w in COORDINATE_WORDS for w in words):
        return None
    return [round(int(w) * COORDINATE_STEP, 3) for w in words]


def grounding_questions(scene: Scene) -> list[Question]:
    """Every referring expression the scene supports, each as a grounding question about one object
    (referents: the anchor, if any, then the object; the answer is location_words of the object's box)."""
    questions = []
    ask = lambda expression, obj, anchors=(): questions.append(  # noqa: E731
        Question("grounding", WHERE.format(x=expression), location_words(obj.box), (*anchors, obj.object_id)))
    anchors = [scene.find(c) for c in unique_classes(scene)]
    for cls in CLASS_NAMES:
        objects = [o for o in scene.objects if o.cls == cls]
        if len(objects) == 1:
            ask(cls, objects[0])
            continue
        for obj in objects:
            if sum(o.colour == obj.colour for o in objects) == 1:
                ask(f"{obj.colour} {cls}", obj)
        for anchor in anchors:
            distance = sorted((point_box_distance(anchor.centre, o.box), o.object_id) for o in objects)
            if len(distance) > 1 and distance[1][0] - distance[0][0] >= RELATION_MARGIN:
                (obj,) = [o for o in objects if o.object_id == distance[0][1]]
                ask(CLOSEST_TO.format(x=cls, y=anchor.cls), obj, (anchor.object_id,))
    return questions


def caption(scene: Scene, obj) -> str:
    """The templated caption of `obj`: colour and class, and the object clearly nearest to it if there is one."""
    text = f"{obj.colour} {obj.cls}"
    nearest = closest_object(scene, obj)
    return text if nearest is None else NEXT_TO.format(c=text, y=nearest.cls)


def captioning_questions(scene: Scene) -> list[Question]:
    """One captioning question per object (referents: the object, then the nearest object its caption names)."""
    questions = []
    for obj in scene.objects:
        nearest = closest_object(scene, obj)
        referents = (obj.object_id,) if nearest is None else (obj.object_id, nearest.object_id)
        questions.append(Question("captioning", DESCRIBE_CLICKED, caption(scene, obj), referents,
                                  click=tuple(float(v) for v in obj.centre)))
    return questions


def task_questions(scene: Scene, visible: set[int], rng: np.random.Generator,
                   per_task: dict[str, int]) -> list[Question]:
    """Up to per_task[task] questions of each 3D task about objects the spatial tokens show, in a random order."""
    chosen = []
    for task, build in (("grounding", grounding_questions), ("captioning", captioning_questions)):
        pool = [q for q in build(scene) if set(q.referents) <= visible]
        k = min(per_task.get(task, 0), len(pool))
        chosen += [pool[i] for i in rng.choice(len(pool), size=k, replace=False)] if k else []
    return [chosen[i] for i in rng.permutation(len(chosen))]


def question_object(question: Question) -> int:
    """The object a grounding or captioning question is about (its box is the one scored)."""
    return question.referents[-1] if question.qtype == "grounding" else question.referents[0]
