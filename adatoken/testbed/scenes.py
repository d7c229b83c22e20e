"""Procedural indoor rooms in the spirit of ScanNet: a room box and 6-16 furnished, coloured objects.

Coordinates are metres in the room frame: the origin is a floor corner, x runs along the room's width,
y along its depth and z up. Every object is an axis-aligned box; no two boxes overlap, so rays and
questions see a physically plausible room. A scene is a pure function of its seed.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

COLOURS = ("red", "green", "blue", "yellow", "white", "black", "brown", "grey")
WALL_COLOURS = ("white", "grey", "yellow")
FLOOR_COLOURS = ("brown", "grey", "black")


@dataclass(frozen=True)
class ClassSpec:
    """How one object class is sized and placed. Sizes are (min, max) of width, depth, height."""

    plural: str
    width: tuple[float, float]
    depth: tuple[float, float]
    height: tuple[float, float]
    placement: str  # "floor": stands freely; "wall": stands on the floor against a wall; "mounted": hangs on a wall
    max_count: int
    weight: float  # relative frequency when a scene draws its objects
    mount_height: tuple[float, float] = (0.0, 0.0)  # bottom of a mounted object above the floor


CLASSES: dict[str, ClassSpec] = {
    "chair": ClassSpec("chairs", (0.45, 0.55), (0.45, 0.55), (0.8, 1.0), "floor", 5, 3.0),
    "table": ClassSpec("tables", (0.8, 1.6), (0.6, 1.0), (0.7, 0.78), "floor", 2, 1.2),
    "sofa": ClassSpec("sofas", (1.6, 2.2), (0.8, 1.0), (0.7, 0.9), "wall", 2, 0.8),
    "bed": ClassSpec("beds", (1.4, 1.8), (1.9, 2.1), (0.5, 0.6), "wall", 1, 0.6),
    "lamp": ClassSpec("lamps", (0.3, 0.4), (0.3, 0.4), (1.4, 1.7), "floor", 3, 1.2),
    "tv": ClassSpec("tvs", (0.8, 1.4), (0.06, 0.1), (0.5, 0.8), "mounted", 1, 0.7, (1.0, 1.2)),
    "cabinet": ClassSpec("cabinets", (0.6, 1.2), (0.4, 0.6), (0.6, 1.0), "wall", 3, 1.0),
    "desk": ClassSpec("desks", (1.0, 1.4), (0.5, 0.7), (0.72, 0.76), "wall", 2, 0.8),
    "shelf": ClassSpec("shelves", (0.8, 1.2), (0.3, 0.4), (1.6, 2.0), "wall", 2, 0.8),
    "plant": ClassSpec("plants", (0.3, 0.5), (0.3, 0.5), (0.4, 1.2), "floor", 4, 1.2),
    "door": ClassSpec("doors", (0.8, 1.0), (0.05, 0.08), (2.0, 2.1), "mounted", 2, 1.0, (0.0, 0.0)),
    "window": ClassSpec("windows", (0.8, 1.6), (0.05, 0.08), (1.0, 1.4), "mounted", 3, 1.2, (0.8, 1.0)),
    "bin": ClassSpec("bins", (0.25, 0.35), (0.25, 0.35), (0.3, 0.5), "floor", 2, 0.8),
    "box": ClassSpec("boxes", (0.3, 0.6), (0.3, 0.6), (0.2, 0.5), "floor", 4, 1.0),
    "stool": ClassSpec("stools", (0.35, 0.4), (0.35, 0.4), (0.45, 0.7), "floor", 4, 1.0),
}
CLASS_NAMES = tuple(CLASSES)
MIN_OBJECTS, MAX_OBJECTS = 6, 16
CLEARANCE = 0.05  # metres kept free between any two boxes, so nothing touches or interpenetrates


@dataclass(frozen=True)
class SceneObject:
    object_id: int
    cls: str
    colour: str
    box: tuple[float, float, float, float, float, float]  # xmin, ymin, zmin, xmax, ymax, zmax

    @property
    def centre(self) -> np.ndarray:
        b = np.asarray(self.box)
        return (b[:3] + b[3:]) / 2

    @property
    def size(self) -> np.ndarray:
        """Width, depth, height in metres."""
        b = np.asarray(self.box)
        return b[3:] - b[:3]


@dataclass(frozen=True)
class Scene:
    scene_id: str
    seed: int
    room: tuple[float, float, float]  # width (x), depth (y), height (z)
    wall_colour: str
    floor_colour: str
    objects: tuple[SceneObject, ...]

    def count(self, cls: str) -> int:
        return sum(o.cls == cls for o in self.objects)

    def find(self, cls: str) -> SceneObject:
        """The one object of a class; only for classes present exactly once."""
        (obj,) = [o for o in self.objects if o.cls == cls]
        return obj

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> "Scene":
        d = json.loads(text)
        objects = tuple(SceneObject(o["object_id"], o["cls"], o["colour"], tuple(o["box"])) for o in d["objects"])
        return Scene(d["scene_id"], d["seed"], tuple(d["room"]), d["wall_colour"], d["floor_colour"], objects)


def _boxes_clear(box: np.ndarray, others: list[np.ndarray]) -> bool:
    return all(np.any(box[:3] >= o[3:] + CLEARANCE) or np.any(o[:3] >= box[3:] + CLEARANCE) for o in others)


def _propose_box(spec: ClassSpec, room: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    width, depth, height = (rng.uniform(*r) for r in (spec.width, spec.depth, spec.height))
    room_w, room_d, _ = room
    if spec.placement == "floor":
        if rng.random() < 0.5:  # furniture is as often turned 90 degrees as not
            width, depth = depth, width
        x, y = rng.uniform(0.1, room_w - width - 0.1), rng.uniform(0.1, room_d - depth - 0.1)
        return np.array([x, y, 0.0, x + width, y + depth, height])
    z = rng.uniform(*spec.mount_height) if spec.placement == "mounted" else 0.0
    wall = int(rng.integers(4))  # 0: y=0, 1: y=room_d, 2: x=0, 3: x=room_w; the object faces into the room
    along = room_w if wall < 2 else room_d
    s = rng.uniform(0.1, along - width - 0.1)
    if wall == 0:
        return np.array([s, 0.0, z, s + width, depth, z + height])
    if wall == 1:
        return np.array([s, room_d - depth, z, s + width, room_d, z + height])
    if wall == 2:
        return np.array([0.0, s, z, depth, s + width, z + height])
    return np.array([room_w - depth, s, z, room_w, s + width, z + height])


def _draw_classes(rng: np.random.Generator, num: int) -> list[str]:
    counts = dict.fromkeys(CLASS_NAMES, 0)
    weights = np.array([CLASSES[c].weight for c in CLASS_NAMES])
    drawn = []
    for _ in range(num):
        open_ = np.array([counts[c] < CLASSES[c].max_count for c in CLASS_NAMES])
        p = weights * open_
        cls = CLASS_NAMES[int(rng.choice(len(CLASS_NAMES), p=p / p.sum()))]
        counts[cls] += 1
        drawn.append(cls)
    return drawn


def generate_scene(seed: int, scene_id: str | None = None) -> Scene:
    """The room for `seed`. The same seed always gives the same scene (one numpy Generator, used in order)."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"scene seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng(int(seed))
    room = (round(rng.uniform(4.0, 7.0), 3), round(rng.uniform(3.5, 6.0), 3), round(rng.uniform(2.5, 3.0), 3))
    wall_colour = WALL_COLOURS[int(rng.integers(len(WALL_COLOURS)))]
    floor_colour = FLOOR_COLOURS[int(rng.integers(len(FLOOR_COLOURS)))]
    wanted = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    drawn = _draw_classes(rng, wanted + 4)
    # Big pieces first: they are the hardest to fit. The four spares stand in for pieces that did not fit.
    area = {c: np.mean(CLASSES[c].width) * np.mean(CLASSES[c].depth) for c in CLASS_NAMES}
    boxes: list[np.ndarray] = []
    placed: list[tuple[str, np.ndarray]] = []
    for cls in sorted(drawn[:wanted], key=lambda c: -area[c]) + drawn[wanted:]:
        if len(placed) == wanted:
            break
        for _ in range(30):
            box = _propose_box(CLASSES[cls], room, rng)
            if _boxes_clear(box, boxes):
                boxes.append(box)
                placed.append((cls, box))
                break
    # Object ids follow a fixed order (class, then position) so they do not leak the placement order.
    placed.sort(key=lambda cb: (CLASS_NAMES.index(cb[0]), tuple(cb[1])))
    objects = tuple(
        SceneObject(i, cls, COLOURS[int(rng.integers(len(COLOURS)))], tuple(round(float(v), 3) for v in box))
        for i, (cls, box) in enumerate(placed)
    )
    return Scene(scene_id or f"scene{int(seed):07d}", int(seed), room, wall_colour, floor_colour, objects)


@lru_cache(maxsize=4096)
def scene_for_seed(seed: int) -> Scene:
    """Cached `generate_scene`: questions, tokens and evaluation all rebuild scenes from seeds."""
    return generate_scene(seed)
