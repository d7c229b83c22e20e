"""LLaVA-3D-style spatial tokens for a scene: multi-view patches, back-projected with depth, voxel-pooled.

LLaVA-3D feeds its LLM "3D patches": CLIP features of the patches of several RGB-D views, each patch
lifted to the 3D point its pixel sees (depth + camera pose), then mean-pooled in 0.2 m voxels and
capped by random sampling. We do the same with a simulated camera: rays are cast against the room's
boxes (vectorised numpy), and a patch "feature" is what a frozen vision encoder would say about what
it sees: the surface's class, colour and object part, each a fixed random direction in feature space,
plus noise. Walls and floor fill most views, so most tokens carry little an answer needs; one object
is spread over many voxels. The learned half (projection + 3D position MLP) lives in model.py.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

from adatoken.testbed.scenes import CLASS_NAMES, COLOURS, Scene, scene_for_seed

BACKGROUND = ("floor", "wall", "ceiling")  # surface classes after the object classes
SURFACE_CLASSES = CLASS_NAMES + BACKGROUND
# An object patch sees the object's top, a side, or its centre. "centre" marks the voxel nearest the
# object's centre (like an object-centre heat map of a detector): exactly one token per visible object,
# which is what lets a small model count instances rather than voxels.
PARTS = ("top", "side", "centre")


@dataclass(frozen=True)
class SpatialConfig:
    num_views: int = 6
    patch_grid: int = 8  # patches per side of a view (LLaVA-3D: 24 on CLIP-L/336)
    fov_degrees: float = 80.0
    camera_height: float = 2.2  # above every free-standing object, so no camera starts inside a box
    voxel_size: float = 0.2  # metres, as LLaVA-3D
    max_tokens: int = 512  # LLaVA-3D caps at 2,560; a CPU-trained testbed affords less (see README)
    feature_dim: int = 64
    noise_std: float = 0.08  # per feature dimension; a code vector has norm ~1
    feature_seed: int = 1234  # the fixed random codes: part of the "vision encoder", so fixed per model

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SpatialTokens:
    points: np.ndarray  # [T, 3] float32, mean 3D point of the patches pooled into each voxel
    features: np.ndarray  # [T, feature_dim] float32, mean patch feature
    object_ids: np.ndarray  # [T] int, the object most patches of the voxel saw; -1 for floor/wall/ceiling
    centre: np.ndarray  # [T] bool, the voxel holds an object's "centre" patches (one voxel per visible object)

    def __len__(self) -> int:
        return len(self.points)

    def select(self, index: np.ndarray) -> "SpatialTokens":
        """The tokens at `index` (an index array or bool mask), in that order."""
        return SpatialTokens(self.points[index], self.features[index], self.object_ids[index], self.centre[index])


def voxel_pool(points: np.ndarray, features: np.ndarray,
               voxel_size: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean-pool patches that fall in the same voxel. Returns (points, features, inverse), voxels ordered
    by their integer (x, y, z) index, lexicographically; `inverse[i]` is the voxel of patch i."""
    keys = np.floor(points / voxel_size).astype(np.int64)
    _, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)

    def mean(values: np.ndarray) -> np.ndarray:
        sums = np.zeros((len(counts), values.shape[1]), dtype=np.float64)
        np.add.at(sums, inverse, values)
        return (sums / counts[:, None]).astype(np.float32)

    return mean(points), mean(features), inverse


def camera_views(scene: Scene, cfg: SpatialConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Cameras on a ring near the walls, each looking down across the room, like a scan walking around it.
    Returns origins [V, 3] and camera-frame rays [V, P, 3] whose forward component is 1, so that
    `origin + depth * ray` back-projects a pixel of depth `depth`."""
    width, depth, _ = scene.room
    centre = np.array([width / 2, depth / 2])
    half = np.array([width / 2 - 0.5, depth / 2 - 0.5])
    g = cfg.patch_grid
    u = (np.arange(g) + 0.5) / g * 2 - 1
    uu, vv = np.meshgrid(u, -u)  # image rows go down, camera "up" goes up
    tan = np.tan(np.radians(cfg.fov_degrees) / 2)
    origins, rays = [], []
    for v in range(cfg.num_views):
        angle = 2 * np.pi * v / cfg.num_views + rng.uniform(-0.2, 0.2)
        ring = np.array([np.cos(angle), np.sin(angle)])
        origin = np.append(centre + half * ring, cfg.camera_height)
        target = np.append(centre - 0.3 * half * ring + rng.uniform(-0.3, 0.3, 2), 0.3)
        forward = (target - origin) / np.linalg.norm(target - origin)
        right = np.cross(forward, [0.0, 0.0, 1.0])
        right /= np.linalg.norm(right)
        up = np.cross(right, forward)
        ray = forward + tan * (uu.reshape(-1, 1) * right + vv.reshape(-1, 1) * up)
        origins.append(origin)
        rays.append(ray)
    return np.array(origins), np.array(rays)


def cast(scene: Scene, origins: np.ndarray, rays: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First surface hit by each ray. Returns depth [V, P] (in units of the ray, see camera_views),
    surface [V, P] (object index, or len(objects) + floor/wall/ceiling index) and top [V, P] (hit a top face)."""
    o = origins[:, None, :]
    safe = np.where(np.abs(rays) < 1e-9, 1e-9, rays)
    room_hi = np.array(scene.room)
    # Inside the room box every ray leaves through exactly one face: the nearest exit plane.
    exits = np.where(safe > 0, (room_hi - o) / safe, -o / safe)
    t = exits.min(-1)
    axis = exits.argmin(-1)
    n_obj = len(scene.objects)
    background = np.where(axis == 2, np.where(rays[..., 2] < 0, 0, 2), 1)  # floor, wall or ceiling
    surface = n_obj + background
    top = np.zeros(t.shape, dtype=bool)
    if n_obj:
        boxes = np.array([ob.box for ob in scene.objects])  # [M, 6]
        t1 = (boxes[:, :3] - o[:, :, None, :]) / safe[:, :, None, :]  # [V, P, M, 3]
        t2 = (boxes[:, 3:] - o[:, :, None, :]) / safe[:, :, None, :]
        near, far = np.minimum(t1, t2), np.maximum(t1, t2)
        t_in, t_out = near.max(-1), far.min(-1)
        t_in = np.where((t_in <= t_out) & (t_in > 1e-6), t_in, np.inf)
        nearest = t_in.argmin(-1)
        t_obj = np.take_along_axis(t_in, nearest[..., None], -1)[..., 0]
        hit = t_obj < t
        entry_axis = np.take_along_axis(near.argmax(-1), nearest[..., None], -1)[..., 0]
        t = np.where(hit, t_obj, t)
        surface = np.where(hit, nearest, surface)
        top = hit & (entry_axis == 2) & (rays[..., 2] < 0)
    return t, surface, top


def spatial_codes(cfg: SpatialConfig) -> dict[str, np.ndarray]:
    """The fixed random feature directions of each surface class, colour and part."""
    rng = np.random.default_rng(cfg.feature_seed)
    draw = lambda n: rng.standard_normal((n, cfg.feature_dim)) / np.sqrt(cfg.feature_dim)  # noqa: E731
    return {"class": draw(len(SURFACE_CLASSES)), "colour": draw(len(COLOURS)), "part": draw(len(PARTS))}


def build_spatial_tokens(scene: Scene, cfg: SpatialConfig = SpatialConfig()) -> SpatialTokens:
    """The spatial tokens of a scene (deterministic: camera jitter, noise and capping are seeded by the scene)."""
    rng = np.random.default_rng([scene.seed, cfg.feature_seed])
    origins, rays = camera_views(scene, cfg, rng)
    depth, surface, top = cast(scene, origins, rays)
    points = (origins[:, None, :] + depth[..., None] * rays).reshape(-1, 3)
    surface, top = surface.reshape(-1), top.reshape(-1)

    n_obj = len(scene.objects)
    objects = scene.objects
    class_idx = np.array([CLASS_NAMES.index(o.cls) for o in objects] + [len(CLASS_NAMES) + i for i in range(3)])
    ceiling_colour = "white"
    colour_idx = np.array([COLOURS.index(o.colour) for o in objects]
                          + [COLOURS.index(c) for c in (scene.floor_colour, scene.wall_colour, ceiling_colour)])
    part = np.where(top, PARTS.index("top"), PARTS.index("side"))
    keys = np.floor(points / cfg.voxel_size).astype(np.int64)
    for j, obj in enumerate(objects):
        seen = np.flatnonzero(surface == j)
        if len(seen):
            anchor = seen[np.argmin(np.linalg.norm(points[seen] - obj.centre, axis=1))]
            in_anchor_voxel = seen[(keys[seen] == keys[anchor]).all(1)]
            part[in_anchor_voxel] = PARTS.index("centre")

    codes = spatial_codes(cfg)
    is_object = surface < n_obj
    features = codes["class"][class_idx[surface]] + codes["colour"][colour_idx[surface]]
    features += np.where(is_object[:, None], codes["part"][part], 0.0)
    features += rng.normal(0.0, cfg.noise_std, features.shape)

    pooled_points, pooled_features, inverse = voxel_pool(points, features, cfg.voxel_size)
    labels = np.where(is_object, surface, n_obj)  # every background surface is one "no object" label
    votes = np.zeros((len(pooled_points), n_obj + 1), dtype=np.int64)
    np.add.at(votes, (inverse, labels), 1)
    object_ids = votes.argmax(1)
    object_ids = np.where(object_ids == n_obj, -1, object_ids)
    centre = np.zeros(len(pooled_points), dtype=bool)
    centre[inverse[part == PARTS.index("centre")]] = True
    tokens = SpatialTokens(pooled_points, pooled_features, object_ids, centre)
    if len(tokens) > cfg.max_tokens:  # LLaVA-3D samples at random; sorting keeps the voxel order
        tokens = tokens.select(np.sort(rng.choice(len(tokens), cfg.max_tokens, replace=False)))
    return tokens


@lru_cache(maxsize=4096)
def spatial_tokens_for_seed(seed: int, cfg: SpatialConfig = SpatialConfig()) -> SpatialTokens:
    """Cached tokens of the scene with this seed (evaluation asks for the same scene once per question, training
    revisits its scene pool)."""
    return build_spatial_tokens(scene_for_seed(seed), cfg)
