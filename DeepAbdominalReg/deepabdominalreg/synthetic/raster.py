"""The phantom's rasteriser: shapes with a signed distance, bounding boxes and HU values painted onto a grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
from scipy.spatial import cKDTree

from deepabdominalreg.config import AIR_HU
from deepabdominalreg.geometry import Grid
from deepabdominalreg.synthetic.primitives import catmull_rom, segment_distance, soft_edge

if TYPE_CHECKING:
    from deepabdominalreg.synthetic.anatomy import Patient

#: Tube content kinds (:class:`Tube`): fluid, gas, gas over fluid, faeces, solid, bone, food.
FLUID, GAS, AIR_FLUID, FECES, SOLID, BONE, FOOD = range(7)

#: A box extent (mm) far beyond any phantom: a shape whose box uses it is in effect unbounded along that axis.
UNBOUNDED_MM = 1e4


def to_local(env: Env, centre: Sequence[float], rotation: np.ndarray | None = None):
    """Coordinates of ``env``'s points in a frame centred at ``centre`` and rotated by ``rotation`` (its columns)."""
    dx = env.x - np.float32(centre[0])
    dy = env.y - np.float32(centre[1])
    dz = env.z - np.float32(centre[2])
    if rotation is None:
        return dx, dy, dz
    r = rotation.astype(np.float32)
    return (r[0, 0] * dx + r[1, 0] * dy + r[2, 0] * dz,
            r[0, 1] * dx + r[1, 1] * dy + r[2, 1] * dz,
            r[0, 2] * dx + r[1, 2] * dy + r[2, 2] * dz)


# ----------------------------------------------------------------------------------------------------------------
# points, shapes and the canvas
# ----------------------------------------------------------------------------------------------------------------


class Env:
    """A set of physical points (LPS mm, float32 arrays of one shape) with body features computed on demand."""

    def __init__(self, patient: Patient, x, y, z, depth=None, fat=None, wall=None):
        self.patient = patient
        self.x, self.y, self.z = x, y, z
        self._depth, self._fat, self._wall = depth, fat, wall

    def _body(self) -> None:
        self._depth, self._fat, self._wall = self.patient.body_layers(self.x, self.y, self.z)

    @property
    def depth(self) -> np.ndarray:
        """Depth below the skin along the ray from the body axis (mm; negative outside the body)."""
        if self._depth is None:
            self._body()
        return self._depth

    @property
    def fat(self) -> np.ndarray:
        """Subcutaneous fat thickness (mm) at these points' angular position."""
        if self._fat is None:
            self._body()
        return self._fat

    @property
    def wall(self) -> np.ndarray:
        """Depth (mm) of the inner surface of the body-wall muscles (subcutaneous fat + muscle thickness)."""
        if self._wall is None:
            self._body()
        return self._wall

    def subset(self, mask: np.ndarray) -> Env:
        """The points where ``mask`` is true (flattened), with their body features if already computed."""
        if self._depth is None:
            return Env(self.patient, self.x[mask], self.y[mask], self.z[mask])
        return Env(self.patient, self.x[mask], self.y[mask], self.z[mask],
                    self._depth[mask], self._fat[mask], self._wall[mask])

    def cavity_sdf(self) -> np.ndarray:
        """Signed distance (mm, approximate) to the abdominal cavity: inside the wall muscles, in front of the spine."""
        pt = self.patient
        wall = self.wall - self.depth
        posterior = self.y - pt.cavity_posterior_y(self.x, self.z)
        return np.maximum(wall, posterior)


@dataclass
class Shape:
    """A structure to paint: ``evaluate(env) -> (sdf_mm, hu, label)`` inside the physical box ``lo..hi`` (mm).

    ``label`` is an int, ``None`` (keep the labels there) or an array per point.  ``within`` restricts the painting
    to voxels that already carry one of these labels.
    """

    name: str
    lo: np.ndarray
    hi: np.ndarray
    evaluate: Callable[[Env], tuple]
    within: tuple[int, ...] | None = None
    prefilter: Callable[[Env], np.ndarray] | None = None

    def sdf(self, env: Env) -> np.ndarray:
        """Signed distance (mm, negative inside) of ``env``'s points to the shape's surface."""
        return self.evaluate(env)[0]


def sdf_shape(name, lo, hi, sdf_fn, value, label, within=None, prefilter=None) -> Shape:
    """A :class:`Shape` from a signed-distance function ``sdf_fn(env)`` (mm) and a value (HU number or
    ``value(env, sdf)``); the other arguments as :class:`Shape`'s."""

    def evaluate(env):
        sdf = sdf_fn(env)
        hu = value(env, sdf) if callable(value) else value
        return sdf, hu, label

    return Shape(name, np.asarray(lo, float), np.asarray(hi, float), evaluate, within, prefilter)


class Tube:
    """A tube of varying radius around a curve, found by nearest-sample search (KD-tree) along the curve.

    Per control point: radius (mm), wall thickness (mm), content kind, content HU, gas level ``y`` (mm), label.
    """

    def __init__(self, name: str, control: np.ndarray, radius, *, kind=SOLID, hu=40.0, wall_mm=0.0,
                 wall_hu=40.0, level=np.inf, label=None, step_mm: float = 1.0, textures=None,
                 haustra_mm: float = 0.0, cortex_mm: float = 1.5, cortex_hu: float = 700.0, within=None,
                 prefilter=None, clip=None):
        control = np.asarray(control, dtype=np.float64)
        n = len(control)

        def per_point(v):
            return np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)).copy()

        curve, param = catmull_rom(control)
        seg = np.linalg.norm(np.diff(curve, axis=0), axis=1)
        arc = np.concatenate([[0.0], np.cumsum(seg)])
        s = np.arange(0.0, arc[-1] + 1e-9, step_mm) if arc[-1] > step_mm else np.array([0.0])
        samples = np.stack([np.interp(s, arc, curve[:, i]) for i in range(3)], axis=1)
        u = np.interp(s, arc, param)
        nearest = np.clip(np.floor(u + 0.5).astype(int), 0, n - 1)
        idx = np.arange(n, dtype=np.float64)
        self.radius = np.interp(u, idx, per_point(radius))
        if haustra_mm > 0:
            self.radius *= 1.0 + 0.12 * np.cos(2 * np.pi * s / haustra_mm)
        self.wall = np.interp(u, idx, per_point(wall_mm)).astype(np.float32)
        self.hu = np.interp(u, idx, per_point(hu)).astype(np.float32)
        self.level = np.interp(u, idx, per_point(level)).astype(np.float32)
        self.kind = per_point(kind).astype(int)[nearest]
        labels = None if label is None else np.broadcast_to(np.asarray(label), (n,))[nearest].astype(np.int32)
        self.labels = labels
        self.wall_hu = np.float32(wall_hu)
        self.cortex_mm, self.cortex_hu = np.float32(cortex_mm), np.float32(cortex_hu)
        self.tree = cKDTree(samples)
        self.samples = samples
        self.radius = self.radius.astype(np.float32)
        self.rmax = float(self.radius.max())
        self.textures = textures
        self.clip = clip
        margin = self.rmax + 4.0
        lo, hi = samples.min(0) - margin, samples.max(0) + margin
        # coarse occupancy grid: cells that may hold points within the tube, to skip the search elsewhere
        self.cell = max(4.0, self.rmax / 2.0)
        self.cell_origin = lo
        cells = np.ceil((hi - lo) / self.cell).astype(int) + 1
        centres = np.stack(np.meshgrid(*[lo[a] + (np.arange(cells[a]) + 0.5) * self.cell for a in range(3)],
                                       indexing="ij"), axis=-1).reshape(-1, 3)
        reach = self.rmax + 3.0 + self.cell * np.sqrt(3.0) / 2.0
        near, _ = self.tree.query(centres, distance_upper_bound=reach)
        self.occupancy = np.isfinite(near).reshape(cells)
        self.shape = Shape(name, lo, hi, self.evaluate, within, prefilter)

    def _candidates(self, env: Env) -> np.ndarray:
        """Flat indices of ``env``'s points whose coarse cell lies near the tube."""
        size = np.asarray(self.occupancy.shape)
        idx = [np.floor((c.ravel() - self.cell_origin[a]) / self.cell).astype(np.int32)
               for a, c in enumerate((env.x, env.y, env.z))]
        inside = np.ones(idx[0].shape, dtype=bool)
        for a in range(3):
            inside &= (idx[a] >= 0) & (idx[a] < size[a])
        cand = np.flatnonzero(inside)
        keep = self.occupancy[idx[0][cand], idx[1][cand], idx[2][cand]]
        return cand[keep]

    def evaluate(self, env: Env):
        """``(sdf_mm, hu, label)`` of ``env``'s points (the :class:`Shape` protocol)."""
        shape = env.x.shape
        sdf = np.full(shape, np.inf, dtype=np.float32)
        hu = np.zeros(shape, dtype=np.float32)
        labels = None if self.labels is None else np.zeros(shape, dtype=np.int32)
        cand = self._candidates(env)
        if cand.size == 0:
            return sdf, hu, labels
        pts = np.stack([env.x.ravel()[cand], env.y.ravel()[cand], env.z.ravel()[cand]], axis=1)
        d, i = self.tree.query(pts, distance_upper_bound=self.rmax + 3.0, workers=-1)
        found = np.isfinite(d)
        hit = cand[found]
        if hit.size == 0:
            return sdf, hu, labels
        i = i[found]
        d = d[found].astype(np.float32)
        r = self.radius[i]
        sub = env.subset(np.unravel_index(hit, shape))
        sdf.ravel()[hit] = d - r if self.clip is None else np.maximum(d - r, self.clip(sub))
        hu.ravel()[hit] = self._values(sub, d, r, i)
        if labels is not None:
            labels.ravel()[hit] = self.labels[i]
        return sdf, hu, labels

    def _values(self, env: Env, d: np.ndarray, r: np.ndarray, i: np.ndarray) -> np.ndarray:
        kind = self.kind[i]
        base = self.hu[i].copy()
        tex = self.textures
        if tex is not None:
            fine = tex["fine"](env.x, env.y, env.z)
        out = base.copy()
        gas = kind == GAS
        out[gas] = AIR_HU
        af = kind == AIR_FLUID
        if af.any():
            f = soft_edge(env.y[af] - self.level[i][af], 1.5)  # 1 in front of the level (anterior, small y): gas
            out[af] = base[af] + f * (AIR_HU - base[af])
        for k, threshold, spread in ((FECES, 1.1, 70.0), (FOOD, 1.6, 35.0)):
            m = kind == k
            if m.any() and tex is not None:
                bubbles = soft_edge((threshold - tex["bubbles"](env.x[m], env.y[m], env.z[m])) * 8.0, 1.0)
                mottled = base[m] + spread * tex["coarse"](env.x[m], env.y[m], env.z[m])
                out[m] = mottled + bubbles * (AIR_HU + 50.0 - mottled)
        solid = kind == SOLID
        if solid.any() and tex is not None:
            out[solid] += 6.0 * fine[solid]
        bone = kind == BONE
        if bone.any():
            c = soft_edge((r[bone] - self.cortex_mm) - d[bone], 1.0)  # 1 in the cortex
            out[bone] = base[bone] + c * (self.cortex_hu - base[bone])
        wall = self.wall[i]
        walled = wall > 0
        if walled.any():
            w = soft_edge((r[walled] - wall[walled]) - d[walled], 1.0)
            out[walled] = out[walled] + w * (self.wall_hu - out[walled])
        return out


class Canvas:
    """The image being painted (HU float32 and labels uint8, both ``zyx``) on a grid, block by block."""

    def __init__(self, grid: Grid, patient: Patient, chunk_voxels: int = 1 << 21):
        self.grid = grid
        self.patient = patient
        self.hu = np.full(grid.shape_zyx, AIR_HU, dtype=np.float32)
        self.labels = np.zeros(grid.shape_zyx, dtype=np.uint8)
        self.pv = float(np.prod(grid.spacing) ** (1.0 / 3.0))
        self.chunk_voxels = chunk_voxels
        m = grid.index_to_physical_matrix()
        self.matrix = m[:3, :3]
        self.origin = m[:3, 3]
        self.depth = np.empty(grid.shape_zyx, dtype=np.float32)
        self.fat = np.empty(grid.shape_zyx, dtype=np.float32)
        self.wall = np.empty(grid.shape_zyx, dtype=np.float32)
        full = (np.full(3, -1e9), np.full(3, 1e9))
        for sl, env in self._blocks(*full, with_body=False):
            self.depth[sl], self.fat[sl], self.wall[sl] = patient.body_layers(env.x, env.y, env.z)

    def _index_box(self, lo: np.ndarray, hi: np.ndarray):
        corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
        idx = self.grid.physical_to_index(corners)
        size = np.asarray(self.grid.size)
        start = np.clip(np.floor(idx.min(0)).astype(np.int64), 0, size)
        stop = np.clip(np.ceil(idx.max(0)).astype(np.int64) + 1, 0, size)
        return start, stop

    def _blocks(self, lo, hi, with_body: bool = True):
        start, stop = self._index_box(np.asarray(lo), np.asarray(hi))
        if np.any(stop <= start):
            return
        ni, nj = stop[0] - start[0], stop[1] - start[1]
        nk_chunk = max(1, self.chunk_voxels // max(1, ni * nj))
        i = np.arange(start[0], stop[0], dtype=np.float64)
        j = np.arange(start[1], stop[1], dtype=np.float64)
        m, o = self.matrix, self.origin
        for k0 in range(start[2], stop[2], nk_chunk):
            k1 = min(stop[2], k0 + nk_chunk)
            k = np.arange(k0, k1, dtype=np.float64)
            coords = [
                (o[a] + m[a, 2] * k[:, None, None] + m[a, 1] * j[None, :, None] + m[a, 0] * i[None, None, :])
                .astype(np.float32)
                for a in range(3)
            ]
            sl = (slice(k0, k1), slice(start[1], stop[1]), slice(start[0], stop[0]))
            if with_body:
                env = Env(self.patient, *coords, depth=self.depth[sl], fat=self.fat[sl],
                           wall=self.wall[sl])
            else:
                env = Env(self.patient, *coords)
            yield sl, env

    def paint(self, shape: Shape) -> None:
        """Paint ``shape`` over what is there: HU blended by its partial-volume fraction, labels where inside."""
        for sl, env in self._blocks(shape.lo, shape.hi):
            hu_block = self.hu[sl]
            lab_block = self.labels[sl]
            if shape.prefilter is not None:
                keep = shape.prefilter(env)
                if not keep.any():
                    continue
                sub = env.subset(keep)
                sdf_k, val_k, lab_k = shape.evaluate(sub)
                sdf = np.full(keep.shape, np.inf, np.float32)
                sdf[keep] = sdf_k
                val = np.zeros(keep.shape, np.float32)
                val[keep] = val_k
                if isinstance(lab_k, np.ndarray):
                    lab = np.zeros(keep.shape, np.int32)
                    lab[keep] = lab_k
                else:
                    lab = lab_k
            else:
                sdf, val, lab = shape.evaluate(env)
            frac = soft_edge(sdf, self.pv).astype(np.float32)
            inside = sdf < 0
            if shape.within is not None:
                allowed = np.isin(lab_block, shape.within)
                frac *= allowed
                inside &= allowed
            hu_block += frac * (val - hu_block)
            if lab is not None:
                if isinstance(lab, np.ndarray):
                    lab_block[inside] = lab[inside]
                else:
                    lab_block[inside] = lab


def bezier_distance(env: Env, p0, p1, p2, pieces: int = 4):
    """In-plane distance (mm) to the quadratic Bezier curve ``p0-p1-p2`` and the curve parameter (0..1)."""
    best_d = best_t = None
    ts = np.linspace(0.0, 1.0, pieces + 1)
    pts = [tuple((1 - t) ** 2 * p0[a] + 2 * (1 - t) * t * p1[a] + t * t * p2[a] for a in range(2)) for t in ts]
    for n in range(pieces):
        d, t = segment_distance(env.x, env.y, pts[n], pts[n + 1])
        t = (n + t) / pieces
        if best_d is None:
            best_d, best_t = d, t
        else:
            closer = d < best_d
            best_d = np.where(closer, d, best_d)
            best_t = np.where(closer, t, best_t)
    return best_d, best_t
