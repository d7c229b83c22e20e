"""Scene questions with one- or two-word answers, in the style of ScanQA and SQA3D, answered by geometry.

Five types: attribute ("What colour is the lamp?"), existence ("Is there a tv in the room?"),
counting ("How many chairs are there?"), relation ("What is closest to the sofa?") and situated
("I am at the bed facing the tv. What is on my left?"). A question only names a class present once
when it needs a unique referent, and relation/situated questions are only asked when the answer wins
by a clear margin, so every question has exactly one right answer.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from adatoken.testbed.scenes import CLASS_NAMES, CLASSES, Scene, SceneObject

QUESTION_TYPES = ("attribute", "existence", "counting", "relation", "situated")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
RELATION_MARGIN = 0.3  # metres: the closest object must beat every object of another class by this much
SITUATED_MARGIN = 0.4  # metres: the same for "farthest to my left/right/behind me"
TEMPLATES = {
    "attribute": ("What colour is the {x}?", "What is the colour of the {x}?"),
    "existence": ("Is there a {x} in the room?", "Is there any {x} here?"),
    "counting": ("How many {xs} are there?", "How many {xs} are in the room?"),
    "relation": ("What is closest to the {x}?", "What is next to the {x}?"),
}
SITUATION = "I am at the {x} facing the {y}."
SITUATED_ASKS = {"left": "What is on my left?", "right": "What is on my right?", "behind": "What is behind me?"}
SIDE_ASK = "Is the {z} on my left or right?"
DESCRIBE = "Describe the room."


@dataclass(frozen=True)
class Question:
    qtype: str
    question: str
    answer: str
    referents: tuple[int, ...]  # ids of the objects the answer depends on (they must be visible to answer it)
    click: tuple[float, float, float] | None = None  # a point the question clicks (referring.CLICK), in metres


def unique_classes(scene: Scene) -> list[str]:
    return [c for c in CLASS_NAMES if scene.count(c) == 1]


def point_box_distance(point: np.ndarray, box: tuple[float, ...]) -> float:
    b = np.asarray(box)
    return float(np.linalg.norm(np.maximum(0.0, np.maximum(b[:3] - point, point - b[3:]))))


def closest_object(scene: Scene, anchor: SceneObject) -> SceneObject | None:
    """The object nearest to the anchor's centre (3D point-to-box distance), if it wins by RELATION_MARGIN
    over every object of another class; None when the answer would be ambiguous."""
    others = [o for o in scene.objects if o.object_id != anchor.object_id]
    dist = {o.object_id: point_box_distance(anchor.centre, o.box) for o in others}
    best = min(others, key=lambda o: dist[o.object_id])
    rivals = [dist[o.object_id] for o in others if o.cls != best.cls]
    if rivals and min(rivals) - dist[best.object_id] < RELATION_MARGIN:
        return None
    return best


def egocentric_frame(me: SceneObject, facing: SceneObject) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Standing at `me`'s centre looking at `facing`'s centre, on the floor plane (z up, so "left" is the
    facing direction turned 90 degrees anticlockwise seen from above). Returns position and unit directions."""
    position = me.centre[:2]
    front = facing.centre[:2] - position
    front = front / np.linalg.norm(front)
    left = np.array([-front[1], front[0]])
    return position, {"front": front, "left": left, "right": -left, "behind": -front}


def farthest_towards(scene: Scene, position: np.ndarray, direction: np.ndarray,
                     exclude: set[int]) -> SceneObject | None:
    """The object reaching farthest in `direction` (the box corner with the largest projection), if it
    reaches at least SITUATED_MARGIN that way and beats every object of another class by SITUATED_MARGIN."""
    others = [o for o in scene.objects if o.object_id not in exclude]
    if not others:
        return None
    boxes = np.array([o.box for o in others])
    centre, half = (boxes[:, [0, 1]] + boxes[:, [3, 4]]) / 2, (boxes[:, [3, 4]] - boxes[:, [0, 1]]) / 2
    reach = (centre - position) @ direction + np.abs(half) @ np.abs(direction)  # best corner of each box
    best = int(np.argmax(reach))
    rivals = reach[[o.cls != others[best].cls for o in others]]
    if reach[best] < SITUATED_MARGIN or (len(rivals) and reach[best] - rivals.max() < SITUATED_MARGIN):
        return None
    return others[best]


def side_of(position: np.ndarray, frame: dict[str, np.ndarray], target: SceneObject) -> str | None:
    """"left" or "right" for a target clearly to one side (30 to 150 degrees off the facing direction)."""
    offset = target.centre[:2] - position
    distance = np.linalg.norm(offset)
    if distance < 0.5:
        return None
    sine = float(offset @ frame["left"]) / distance
    return None if abs(sine) < 0.5 else ("left" if sine > 0 else "right")


def candidate_questions(scene: Scene, rng: np.random.Generator) -> dict[str, list[Question]]:
    """Every question the scene supports, by type (`rng` picks templates and situated anchors only)."""
    out: dict[str, list[Question]] = {t: [] for t in QUESTION_TYPES}
    template = lambda qtype: TEMPLATES[qtype][int(rng.integers(len(TEMPLATES[qtype])))]  # noqa: E731
    ids_of = lambda cls: tuple(o.object_id for o in scene.objects if o.cls == cls)  # noqa: E731
    uniques = unique_classes(scene)
    for cls in uniques:
        obj = scene.find(cls)
        out["attribute"].append(Question("attribute", template("attribute").format(x=cls), obj.colour,
                                         (obj.object_id,)))
        best = closest_object(scene, obj)
        if best is not None:
            out["relation"].append(Question("relation", template("relation").format(x=cls), best.cls,
                                            (obj.object_id, best.object_id)))
    for cls in CLASS_NAMES:
        n = scene.count(cls)
        out["existence"].append(Question("existence", template("existence").format(x=cls), "yes" if n else "no",
                                         ids_of(cls)))
        if n:
            out["counting"].append(Question("counting", template("counting").format(xs=CLASSES[cls].plural),
                                            NUMBER_WORDS[n], ids_of(cls)))
    for me_cls in uniques:
        for facing_cls in uniques:
            me, facing = scene.find(me_cls), scene.find(facing_cls)
            if me_cls == facing_cls or np.linalg.norm(facing.centre[:2] - me.centre[:2]) < 1.0:
                continue
            situation = SITUATION.format(x=me_cls, y=facing_cls)
            position, frame = egocentric_frame(me, facing)
            ask = str(rng.choice(list(SITUATED_ASKS)))
            best = farthest_towards(scene, position, frame[ask], {me.object_id, facing.object_id})
            if best is not None:
                out["situated"].append(Question("situated", f"{situation} {SITUATED_ASKS[ask]}", best.cls,
                                                (me.object_id, facing.object_id, best.object_id)))
            targets = [c for c in uniques if c not in (me_cls, facing_cls)]
            if targets:
                target = scene.find(str(rng.choice(targets)))
                side = side_of(position, frame, target)
                if side is not None:
                    out["situated"].append(Question("situated", f"{situation} {SIDE_ASK.format(z=target.cls)}", side,
                                                    (me.object_id, facing.object_id, target.object_id)))
    return out


def sample_questions(scene: Scene, rng: np.random.Generator, per_type: int | Mapping[str, int],
                     visible: set[int] | None = None) -> list[Question]:
    """Up to `per_type` questions of each type (or `per_type[qtype]`), answerable from the visible objects, in a
    shuffled order. Existence and counting are balanced: half the existence answers are "no", and counting
    favours classes with several instances (otherwise nearly every count would be "one")."""
    counts = per_type if isinstance(per_type, Mapping) else dict.fromkeys(QUESTION_TYPES, per_type)
    chosen: list[Question] = []
    for qtype, questions in candidate_questions(scene, rng).items():
        n = counts[qtype]
        if visible is not None:
            questions = [q for q in questions if set(q.referents) <= visible]
        if not questions:
            continue
        if qtype == "existence":
            yes = [q for q in questions if q.answer == "yes"]
            no = [q for q in questions if q.answer == "no"]
            pools = [p for p in (yes, no) if p]
            picks = [pools[int(rng.integers(len(pools)))] for _ in range(n)]
            chosen += [p[int(rng.integers(len(p)))] for p in picks]
            continue
        weights = np.ones(len(questions))
        if qtype == "counting":
            weights = np.array([1.0 if q.answer == "one" else 3.0 for q in questions])
        k = min(n, len(questions))
        idx = rng.choice(len(questions), size=k, replace=False, p=weights / weights.sum())
        chosen += [questions[i] for i in idx]
    order = rng.permutation(len(chosen))
    return [chosen[i] for i in order]


def describe(scene: Scene, visible: set[int] | None = None) -> str:
    """A dense caption for training ("chair blue , chair red , lamp yellow , ..."): every visible object as
    class and colour, in class order then along x. Like LLaVA's alignment captions it ties words to the
    spatial tokens one object at a time: each colour is read right after its class word."""
    shown = [o for o in scene.objects if visible is None or o.object_id in visible]
    shown.sort(key=lambda o: (CLASS_NAMES.index(o.cls), o.box[0]))
    return " , ".join(f"{o.cls} {o.colour}" for o in shown)
