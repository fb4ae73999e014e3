"""Procedural abdominal CT phantom: a plausible non-contrast abdomen-pelvis CT with organ labels, from a seed.

The anatomy is defined analytically in physical space (LPS, mm; x to the patient's left, y posterior, z superior),
so the same ``seed`` gives the same patient on any grid: any spacing (isotropic or not) and any direction cosines.
Every ``seed`` is a different "patient" (body size and shape, fat thickness, organ sizes and positions, bowel
loops, tissue densities).  The field of view is about 400 x 360 mm in-plane and 300 mm along z, centred on the
origin: from the lower thorax (lung bases, liver dome) to the iliac wings.  The patient lies supine on a curved CT
table (posterior, large y) that belongs to no label.

Label ids follow TotalSegmentator's ``total`` task (see :data:`PHANTOM_LABELS`), so the same label groups and
evaluation code serve the phantom and real CT segmented by TotalSegmentator.  Skin, subcutaneous fat, abdominal
wall muscle, intra-abdominal fat and intervertebral discs carry label 0, as in TotalSegmentator.

Rendering paints the structures one after the other with a soft (one-voxel) edge, which gives partial-volume
blending; :func:`add_ct_noise` adds scanner-like noise and casts to int16 HU.
"""


from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from deepabdominalreg.geometry import Grid
from deepabdominalreg.synthetic.primitives import (
    Texture,
    ellipse_sdf,
    ellipsoid_sdf,
    rotation_xyz,
    smooth_min,
    soft_edge,
)
from deepabdominalreg.synthetic.raster import (
    AIR_FLUID,
    BONE,
    FECES,
    FLUID,
    FOOD,
    GAS,
    SOLID,
    UNBOUNDED_MM,
    Canvas,
    Env,
    Shape,
    Tube,
    bezier_distance,
    sdf_shape,
    to_local,
)

#: Label ids of the phantom (TotalSegmentator ``total`` ids and names); 0 is background (and unlabelled tissue).
PHANTOM_LABELS: dict[int, str] = {
    0: "background",
    1: "spleen",
    2: "kidney_right",
    3: "kidney_left",
    4: "gallbladder",
    5: "liver",
    6: "stomach",
    7: "pancreas",
    11: "lung_lower_lobe_left",
    14: "lung_lower_lobe_right",
    18: "small_bowel",
    19: "duodenum",
    20: "colon",
    25: "sacrum",
    27: "vertebrae_L5",
    28: "vertebrae_L4",
    29: "vertebrae_L3",
    30: "vertebrae_L2",
    31: "vertebrae_L1",
    32: "vertebrae_T12",
    33: "vertebrae_T11",
    34: "vertebrae_T10",
    35: "vertebrae_T9",
    36: "vertebrae_T8",
    37: "vertebrae_T7",
    52: "aorta",
    63: "inferior_vena_cava",
    65: "iliac_artery_left",
    66: "iliac_artery_right",
    67: "iliac_vena_left",
    68: "iliac_vena_right",
    77: "hip_left",
    78: "hip_right",
    79: "spinal_cord",
    86: "autochthon_left",
    87: "autochthon_right",
    88: "iliopsoas_left",
    89: "iliopsoas_right",
    98: "rib_left_7",
    99: "rib_left_8",
    100: "rib_left_9",
    101: "rib_left_10",
    102: "rib_left_11",
    103: "rib_left_12",
    110: "rib_right_7",
    111: "rib_right_8",
    112: "rib_right_9",
    113: "rib_right_10",
    114: "rib_right_11",
    115: "rib_right_12",
    117: "costal_cartilages",
}

#: Physical field of view (mm) along the grid's x, y and z axes; the grid is centred on the LPS origin.
PHANTOM_FOV_MM: tuple[float, float, float] = (400.0, 360.0, 300.0)

_LABEL_ID = {name: key for key, name in PHANTOM_LABELS.items()}
_VERTEBRA_NAMES = ("L5", "L4", "L3", "L2", "L1", "T12", "T11", "T10", "T9", "T8", "T7")


# ----------------------------------------------------------------------------------------------------------------
# the patient: random anatomy from a seed
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Vertebra:
    name: str
    label: int
    z: float  # centre of the body (mm)
    height: float
    rx: float
    ry: float


@dataclass
class Patient:
    """All random parameters of one phantom patient (mm, HU) and the body-geometry functions."""

    seed: int
    rng: np.random.Generator = field(repr=False)

    def __post_init__(self) -> None:
        rng = self.rng
        u = rng.uniform
        self.s = u(0.9, 1.1)  # in-plane organ scale
        self.sz = u(0.92, 1.08)  # cranio-caudal scale
        self.half_width = min(u(140.0, 180.0), 182.0)
        self.b_post = u(88.0, 100.0)
        self.b_ant = u(115.0, 140.0) * self.half_width / 160.0
        self.y_back = u(100.0, 110.0)  # most posterior skin point (mm)
        self.yc = self.y_back - self.b_post
        self.n_ant = u(1.9, 2.3)
        self.n_post = u(2.6, 3.4)
        self.shape_modes = [(m, u(-0.025, 0.025), u(0, 2 * np.pi)) for m in (2, 3, 4)]
        self.width_slope = u(-0.05, 0.05)
        self.width_curve = u(-0.06, 0.02)
        self.fat0 = u(7.0, 30.0)
        self.fat_anterior = u(0.1, 0.6)
        self.fat_lateral = u(0.0, 0.5)
        self.muscle_mm = u(9.0, 14.0)
        # tissue densities (non-contrast)
        self.hu_fat = u(-110.0, -90.0)
        self.hu_muscle = u(42.0, 56.0)
        self.hu_liver = u(48.0, 66.0)
        self.hu_spleen = u(40.0, 50.0)
        self.hu_kidney = u(26.0, 36.0)
        self.hu_blood = u(36.0, 46.0)
        self.hu_cancellous = u(110.0, 220.0)
        self.hu_cortical = u(600.0, 1000.0)
        # spine: vertebral levels from the L5/S1 disc upwards
        self.z_ls = u(-118.0, -95.0)
        self.scoliosis = (u(-4.0, 4.0), u(150.0, 300.0), u(0, 2 * np.pi))
        self.lordosis = u(6.0, 16.0)
        self.vertebrae: list[_Vertebra] = []
        disc_ls = 11.0 * self.sz
        z = self.z_ls + disc_ls / 2
        self.discs: list[tuple[float, float]] = [(self.z_ls, disc_ls)]
        for n, name in enumerate(_VERTEBRA_NAMES):
            lumbar = name.startswith("L")
            height = (27.0 - 0.5 * n if lumbar else 25.0 - 1.0 * (n - 5)) * self.sz
            disc = (10.0 if lumbar else 6.5 - 0.3 * (n - 5)) * self.sz
            t = n / (len(_VERTEBRA_NAMES) - 1)
            rx = (25.0 - 8.0 * t) * self.s
            ry = (19.0 - 5.0 * t) * self.s
            label = _LABEL_ID.get(f"vertebrae_{name}", 0)
            self.vertebrae.append(_Vertebra(name, label, z + height / 2, height, rx, ry))
            z += height
            self.discs.append((z + disc / 2, disc))
            z += disc
        self.level = {v.name: v.z for v in self.vertebrae}
        self.period = (self.level["L1"] - self.level["L5"]) / 4.0
        self.y_spine0 = self.y_back - self._fat_at(np.pi / 2, 0.0) - u(58.0, 68.0) * self.s
        # diaphragm
        self.z_dome = self.level["T9"] + u(-10.0, 15.0)
        self.z_crest = self.discs[1][0] + u(0.0, 12.0)  # iliac crest near the L4/L5 disc

    # ---- body outline -------------------------------------------------------------------------------------------
    def half_width_at(self, z):
        """Half the body's left-right width (mm) at height ``z`` (mm): wider towards the pelvis."""
        zn = np.asarray(z, np.float32) / 150.0
        pelvis = 0.06 / (1.0 + np.exp((z - (self.z_crest - 25.0)) / 15.0))
        return self.half_width * (1.0 + self.width_slope * zn + self.width_curve * zn * zn + pelvis)

    def body_radius(self, theta, z):
        """Distance (mm) from the body axis ``(0, yc)`` to the skin along the in-plane direction ``theta``."""
        c, s = np.cos(theta), np.sin(theta)
        a = self.half_width_at(z)
        posterior = s > 0
        b = np.where(posterior, self.b_post, self.b_ant).astype(np.float32)
        n = np.where(posterior, self.n_post, self.n_ant).astype(np.float32)
        r = (np.abs(c / a) ** n + np.abs(s / b) ** n) ** (-1.0 / n)
        wobble = 1.0
        for m, amp, phase in self.shape_modes:
            wobble = wobble + amp * np.cos(m * theta + phase + 0.004 * z)
        return (r * wobble).astype(np.float32)

    def _fat_at(self, theta, z):
        s = np.sin(theta)
        factor = 1.0 + self.fat_anterior * np.maximum(-s, 0) + self.fat_lateral * np.abs(np.cos(theta))
        factor = factor - 0.35 * np.maximum(s, 0) + 0.1 * np.cos(2 * theta + 0.01 * z)
        return (self.fat0 * np.maximum(factor, 0.25)).astype(np.float32)

    def _muscle_at(self, theta, z):
        s = np.sin(theta)
        m = self.muscle_mm * (1.0 + 0.3 * np.maximum(-s, 0) + 0.2 * np.maximum(s, 0))
        linea_alba = np.exp(-((np.angle(np.exp(1j * (theta + np.pi / 2))) * self.b_ant / 7.0) ** 2))
        return (m * (1.0 - 0.7 * linea_alba)).astype(np.float32)

    def wall_at(self, theta, z):
        """Depth (mm) below the skin of the inner surface of the wall muscles along direction ``theta``."""
        return self._fat_at(theta, z) + self._muscle_at(theta, z)

    def body_layers(self, x, y, z):
        """Depth below the skin, subcutaneous fat thickness and wall depth (all mm) at points ``x, y, z``."""
        dy = y - np.float32(self.yc)
        rho = np.sqrt(x * x + dy * dy)
        theta = np.arctan2(dy, x)
        depth = self.body_radius(theta, z) - rho
        fat = self._fat_at(theta, z)
        return depth.astype(np.float32), fat, fat + self._muscle_at(theta, z)

    def skin_point(self, theta: float, z: float, depth: float) -> np.ndarray:
        """The point ``depth`` mm below the skin along direction ``theta`` at height ``z`` (mm, LPS)."""
        r = float(self.body_radius(np.float32(theta), np.float32(z))) - depth
        return np.array([r * np.cos(theta), self.yc + r * np.sin(theta), z])

    def pull_inside(self, points: np.ndarray, margins) -> np.ndarray:
        """Move points (``(N, 3)`` mm) in-plane towards the body axis until ``margins`` mm inside the cavity."""
        points = np.array(points, dtype=np.float64)
        margins = np.broadcast_to(np.asarray(margins, dtype=np.float64), (len(points),))
        for n, p in enumerate(points):
            target = np.array([float(self.spine_x(p[2])), self.yc - 20.0])
            for _ in range(80):
                env = Env(self, *[np.array([v], np.float32) for v in p])
                if float(env.cavity_sdf()[0]) <= -margins[n]:
                    break
                step = target - p[:2]
                length = np.linalg.norm(step)
                if length < 3.0:
                    break
                p[:2] += 3.0 * step / length
            points[n] = p
        return points

    # ---- spine --------------------------------------------------------------------------------------------------
    def spine_y(self, z):
        """``y`` (mm) of the vertebral body centres along z (lumbar lordosis: L3 most anterior)."""
        z = np.asarray(z, np.float32)
        bump = np.exp(-(((z - self.level["L3"]) / (2.2 * self.period)) ** 2))
        return (self.y_spine0 - self.lordosis * bump).astype(np.float32)

    def spine_x(self, z):
        """Left-right position (mm, LPS x) of the spine's axis at height ``z`` (mm): a mild scoliosis."""
        amp, wavelength, phase = self.scoliosis
        return (amp * np.sin(2 * np.pi * np.asarray(z, np.float32) / wavelength + phase)).astype(np.float32)

    def cavity_posterior_y(self, x, z):
        """Posterior limit (mm) of the abdominal cavity: just behind the vertebral bodies, deeper laterally."""
        return self.spine_y(z) + 15.0 * self.s + (x - self.spine_x(z)) ** 2 / (150.0 * self.s)

    def diaphragm_z(self, x, y):
        """Height (mm) of the diaphragm: domes high centrally, deep posterior-lateral recesses."""
        a = np.float32(self.half_width * 0.8)
        right_higher = 12.0 / (1.0 + np.exp(np.asarray(x, np.float32) / 25.0))
        post = np.maximum(y - np.float32(self.yc - 20.0), 0.0) / np.float32(self.b_post)
        return self.z_dome + right_higher - 45.0 * (x / a) ** 2 - 75.0 * post**2


# ----------------------------------------------------------------------------------------------------------------
# anatomy: the list of shapes, in painting order
# ----------------------------------------------------------------------------------------------------------------


def _organ(pt: Patient, name: str, lobes, *, label: int, hu, rng, warp_mm=6.0, clip_cavity=True,
           below_diaphragm=True, blend=18.0, texture_hu=4.0, extra_sdf=None) -> Shape:
    """A smooth organ: union of rotated ellipsoids ``(centre, semi_axes, rotation)``, domain-warped, clipped."""
    warps = [Texture(rng, 110.0, 4) for _ in range(3)]
    tex = Texture(rng, 25.0, 6)
    lo = np.min([np.asarray(c) - max(s) for c, s, _ in lobes], axis=0) - warp_mm - 2
    hi = np.max([np.asarray(c) + max(s) for c, s, _ in lobes], axis=0) + warp_mm + 2

    def sdf_fn(env):
        wx = env.x + warp_mm * warps[0](env.x, env.y, env.z)
        wy = env.y + warp_mm * warps[1](env.x, env.y, env.z)
        wz = env.z + warp_mm * warps[2](env.x, env.y, env.z)
        wenv = Env(pt, wx, wy, wz)
        sdf = None
        for centre, semi, rotation in lobes:
            d = ellipsoid_sdf(to_local(wenv, centre, rotation), semi)
            sdf = d if sdf is None else smooth_min(sdf, d, blend)
        if clip_cavity:
            sdf = np.maximum(sdf, env.cavity_sdf())
        if below_diaphragm:
            sdf = np.maximum(sdf, env.z - (pt.diaphragm_z(env.x, env.y) - 5.0))
        if extra_sdf is not None:
            sdf = np.maximum(sdf, extra_sdf(env))
        return sdf

    def value(env, sdf):
        return hu + texture_hu * tex(env.x, env.y, env.z)

    return sdf_shape(name, lo, hi, sdf_fn, value, label)


def _vertebra_shape(pt: Patient, v: _Vertebra, textures) -> Shape:
    lumbar = v.name.startswith("L")
    canal_ry = 9.0 * pt.s
    canal_dy = v.ry + canal_ry + 2.0
    tp_len = (42.0 if v.name in ("L3", "L4") else 36.0 if lumbar else 30.0) * pt.s
    sp_len = 40.0 * pt.s
    h = v.height
    lo = np.array([-tp_len - 10, pt.spine_y(v.z) - v.ry - 25, v.z - h / 2 - 20])
    hi = np.array([tp_len + 10, pt.spine_y(v.z) + canal_dy + sp_len + 20, v.z + h / 2 + 10])
    cortex = 1.2

    def sdf_fn(env):
        x = env.x - pt.spine_x(env.z)
        y = env.y - pt.spine_y(env.z)
        z = env.z - np.float32(v.z)
        body = np.maximum(ellipse_sdf(x, y, v.rx, v.ry), np.abs(z) - h / 2)
        yc = y - canal_dy
        canal = ellipse_sdf(x, yc, 10.5 * pt.s, canal_ry)
        arch_outer = ellipse_sdf(x, yc, 19.0 * pt.s, canal_ry + 7.0)
        arch = np.maximum(np.maximum(arch_outer, -canal), np.maximum(-yc - 4.0, np.abs(z + 1.0) - h / 2 - 1.0))
        zs = z + 3.0 + 0.35 * np.maximum(yc, 0)
        spinous = np.maximum.reduce([np.abs(x) - 3.5, np.abs(yc - (canal_ry + sp_len / 2)) - sp_len / 2,
                                     np.abs(zs) - (0.32 * h), env.fat + 5.0 - env.depth])
        tilt = 0.0 if lumbar else 0.5  # thoracic transverse processes point posterolaterally
        yt = yc - tilt * np.maximum(np.abs(x) - 10.0, 0) + 2.0
        transverse = np.maximum.reduce([np.abs(x - np.float32(0)) - tp_len, 12.0 - np.abs(x),
                                        np.abs(yt) - 5.0, np.abs(z + 1.0) - 6.0])
        return np.minimum.reduce([body, arch, spinous, transverse])

    def value(env, sdf):
        trabecular = pt.hu_cancellous + 20.0 * textures["fine"](env.x, env.y, env.z)
        return trabecular + soft_edge(-(sdf + cortex), 1.0) * (pt.hu_cortical - trabecular)

    return sdf_shape(f"vertebra_{v.name}", lo, hi, sdf_fn, value, v.label)


def _muscle_value(pt: Patient, tex, offset: float = 0.0, amplitude: float = 4.0):
    return lambda e, d: pt.hu_muscle + offset + amplitude * tex["fine"](e.x, e.y, e.z)


def _bone_value(pt: Patient, tex, cortex_mm: float = 1.5):
    """Cancellous bone inside, cortical bone within ``cortex_mm`` of the surface (HU)."""

    def value(env, sdf):
        trabecular = pt.hu_cancellous + 20.0 * tex["fine"](env.x, env.y, env.z)
        return trabecular + soft_edge(-(sdf + cortex_mm), 1.0) * (pt.hu_cortical - trabecular)

    return value


def _spine_at(pt: Patient, z: float) -> tuple[float, float]:
    return float(pt.spine_x(z)), float(pt.spine_y(z))


def _table(pt: Patient) -> list[Shape]:
    """CT table: two thin curved carbon shells with a foam core, posterior to the patient, no label."""
    u = pt.rng.uniform
    y_table = pt.y_back + u(6.0, 22.0)  # air gap below the patient
    radius = u(500.0, 900.0)
    thick = u(28.0, 45.0)
    centre_y = np.float32(y_table - radius)
    lo = np.array([-250.0, y_table - 60.0, -UNBOUNDED_MM])
    hi = np.array([250.0, y_table + thick + 10.0, UNBOUNDED_MM])

    def radial(env):
        return np.sqrt(env.x**2 + (env.y - centre_y) ** 2) - np.float32(radius)

    def core(env):
        r = radial(env)
        return np.maximum.reduce([-r, r - thick, np.abs(env.x) - 235.0, centre_y - env.y])

    shapes = [sdf_shape("table_core", lo, hi, core, -900.0, None)]
    for offset, th in ((0.0, 2.5), (thick, 3.0)):
        def shell(env, offset=offset, th=th):
            return np.maximum.reduce([np.abs(radial(env) - offset) - th / 2, np.abs(env.x) - 235.0,
                                      centre_y - env.y])

        shapes.append(sdf_shape("table_shell", lo, hi, shell, u(250.0, 450.0), None))
    return shapes


def _body_wall(pt: Patient, tex) -> list[Shape]:
    """Skin, subcutaneous fat, wall muscles, intra-abdominal fat, diaphragm, lung bases, back muscles."""
    rng, u, s = pt.rng, pt.rng.uniform, pt.s
    lo = np.array([-200.0, -200.0, -UNBOUNDED_MM])
    hi = np.array([200.0, pt.y_back + 5.0, UNBOUNDED_MM])
    hu_visceral_fat = pt.hu_fat + u(0.0, 12.0)
    shapes = [
        sdf_shape("skin", lo, hi, lambda e: -e.depth, 25.0, None),
        sdf_shape("subcutaneous_fat", lo, hi, lambda e: 2.0 - e.depth,
                    lambda e, d: pt.hu_fat + 6.0 * tex["coarse"](e.x, e.y, e.z), None),
        sdf_shape("muscle_wall", lo, hi, lambda e: e.fat - e.depth, _muscle_value(pt, tex), None),
        sdf_shape("cavity", lo, hi, lambda e: e.cavity_sdf(),
                    lambda e, d: hu_visceral_fat + 6.0 * tex["coarse"](e.x, e.y, e.z), None),
    ]

    def diaphragm(env):
        zd = pt.diaphragm_z(env.x, env.y)
        return np.maximum(np.abs(env.z - (zd - 2.5)) - 3.0, env.wall - 3.0 - env.depth)

    shapes.append(sdf_shape("diaphragm", lo, hi, diaphragm, pt.hu_muscle, None))

    def lung(env):
        zd = pt.diaphragm_z(env.x, env.y)
        return np.maximum.reduce([zd - env.z, env.wall - env.depth,
                                  env.y - (pt.spine_y(env.z) + 45.0 * s),
                                  12.0 + 0.4 * (pt.spine_y(env.z) - env.y) - np.abs(env.x - pt.spine_x(env.z))])

    lung_tex = Texture(rng, 9.0, 8)

    def lung_value(env, sdf):
        vessels = np.clip(lung_tex(env.x, env.y, env.z) - 1.1, 0.0, None)
        return -860.0 + 12.0 * tex["fine"](env.x, env.y, env.z) + 500.0 * vessels

    for side, name in ((1.0, "lung_lower_lobe_left"), (-1.0, "lung_lower_lobe_right")):
        box_lo = np.array([0.0 if side > 0 else -200.0, -200.0, pt.z_dome - 120.0])
        box_hi = np.array([200.0 if side > 0 else 0.0, 200.0, UNBOUNDED_MM])
        shapes.append(sdf_shape("lung", box_lo, box_hi, lung, lung_value, _LABEL_ID[name]))

    # erector spinae (autochthon) either side of the spinous processes
    for side, name in ((1.0, "autochthon_left"), (-1.0, "autochthon_right")):
        rx, ry = u(21.0, 27.0) * s, u(18.0, 24.0) * s

        def autochthon(env, side=side, rx=rx, ry=ry):
            cx = pt.spine_x(env.z) + side * (rx + 4.0)
            cy = pt.spine_y(env.z) + 18.0 * s + 20.0 + ry * 0.8
            return np.maximum(ellipse_sdf(env.x - cx, env.y - cy, rx, ry), env.fat + 1.5 - env.depth)

        box_lo = np.array([min(0, side * 80), pt.y_spine0 - 40, -UNBOUNDED_MM])
        box_hi = np.array([max(0, side * 80), pt.y_back + 5, UNBOUNDED_MM])
        shapes.append(sdf_shape("autochthon", box_lo, box_hi, autochthon, _muscle_value(pt, tex, -6.0, 8.0),
                                  _LABEL_ID[name]))

    # quadratus lumborum (unlabelled muscle), lateral to the transverse processes
    lv = pt.level
    for side in (1.0, -1.0):
        def quadratus(env, side=side):
            cx = pt.spine_x(env.z) + side * 62.0 * s
            cy = pt.spine_y(env.z) + 28.0 * s
            t = np.clip((lv["T12"] - env.z) / (lv["T12"] - pt.z_crest), 0, 1)
            d = ellipse_sdf(env.x - cx, env.y - cy, (8.0 + 10.0 * t) * s, (6.0 + 5.0 * t) * s)
            return np.maximum.reduce([d, env.z - lv["T12"], pt.z_crest - env.z])

        box_lo = np.array([min(0, side * 110), pt.y_spine0 - 20, pt.z_crest - 5])
        box_hi = np.array([max(0, side * 110), pt.y_spine0 + 60, lv["T12"] + 5])
        shapes.append(sdf_shape("quadratus", box_lo, box_hi, quadratus, pt.hu_muscle, None))
    return shapes


def _solid_organs(pt: Patient) -> dict:
    """Spleen, liver, gallbladder, kidneys (with their hilum)."""
    rng, u, s, lv, y0 = pt.rng, pt.rng.uniform, pt.s, pt.level, pt.y_spine0
    organs: dict = {}

    # spleen: posterolateral left, under the left dome
    spleen_c = (u(80.0, 100.0) * s, y0 + u(5.0, 25.0), lv["T11"] + u(-15.0, 5.0))
    spleen_semi = (u(24.0, 32.0) * s, u(52.0, 66.0) * s, u(45.0, 60.0) * pt.sz)
    organs["spleen_centre"] = np.asarray(spleen_c)
    organs["spleen"] = _organ(pt, "spleen", [(spleen_c, spleen_semi, rotation_xyz(u(-10, 10), u(-10, 10), u(20, 45)))],
                              label=_LABEL_ID["spleen"], hu=pt.hu_spleen, rng=rng)

    # liver: big right lobe, medial segment near the gallbladder fossa, left lobe anterior across the midline
    organs["liver"] = _organ(pt, "liver", [
        ((-u(78.0, 92.0) * s, y0 - u(20.0, 35.0) * s, lv["T12"] + u(-15.0, 5.0)),
         (u(75.0, 90.0) * s, u(85.0, 100.0) * s, u(85.0, 100.0) * pt.sz),
         rotation_xyz(u(-8, 8), u(-25, -10), u(-30, -15))),
        ((-u(20.0, 30.0) * s, y0 - u(55.0, 70.0) * s, lv["T12"] + u(0.0, 15.0)),
         (u(35.0, 45.0) * s, u(35.0, 45.0) * s, u(45.0, 60.0) * pt.sz), None),
        ((u(-10.0, 15.0) * s, y0 - u(90.0, 105.0) * s, lv["T11"] + u(-5.0, 15.0)),
         (u(45.0, 60.0) * s, u(25.0, 35.0) * s, u(30.0, 45.0) * pt.sz), rotation_xyz(0, u(-10, 10), u(5, 25))),
    ], label=_LABEL_ID["liver"], hu=pt.hu_liver, rng=rng, warp_mm=8.0, blend=25.0)

    # gallbladder: under the liver, anterior, tilted
    gb_semi = (u(13.0, 18.0) * s, u(13.0, 18.0) * s, u(28.0, 40.0) * pt.sz)
    gb_c = pt.pull_inside([[-u(40.0, 60.0) * s, y0 - u(85.0, 105.0) * s, lv["L1"] + u(-5.0, 15.0)]],
                          max(gb_semi[:2]) + 4.0)[0]
    organs["gallbladder"] = _organ(pt, "gallbladder",
                                   [(gb_c, gb_semi, rotation_xyz(u(30, 50), u(-15, 15), u(-20, 20)))],
                                   label=_LABEL_ID["gallbladder"], hu=u(5.0, 18.0), rng=rng, warp_mm=2.0,
                                   texture_hu=1.0)

    # kidneys: beside the psoas, hilum facing anteromedially; the right one lower
    organs["kidneys"], organs["hila"] = [], []
    for side, name in ((-1.0, "kidney_right"), (1.0, "kidney_left")):
        zc = lv["L1"] - (u(15.0, 30.0) if side < 0 else u(0.0, 15.0)) * pt.sz
        xs, ys = _spine_at(pt, zc)
        centre = np.array([xs + side * u(68.0, 80.0) * s, ys + u(0.0, 14.0) * s, zc])
        semi = (u(24.0, 29.0) * s, u(20.0, 25.0) * s, u(48.0, 60.0) * pt.sz)
        rot = rotation_xyz(u(-20, -10), side * u(8, 16), side * u(20, 40))
        organs["kidneys"].append(_organ(pt, name, [(centre, semi, rot)], label=_LABEL_ID[name], hu=pt.hu_kidney,
                                        rng=rng, warp_mm=3.0, below_diaphragm=False, clip_cavity=False))
        organs["hila"].append(_kidney_hilum(name, side, centre, semi, rot))
    return organs


def _kidney_hilum(name: str, side: float, centre: np.ndarray, semi, rot: np.ndarray) -> Shape:
    """Renal sinus fat (about -70 HU) with the renal pelvis (fluid), opening medially; keeps the kidney label."""
    c = centre + rot @ np.array([-side * semi[0] * 0.75, 0.0, 0.0])
    sinus_semi = (semi[0] * 0.55, semi[1] * 0.45, semi[2] * 0.45)
    pelvis_c = c + rot @ np.array([side * semi[0] * 0.1, 0.0, -semi[2] * 0.1])
    pelvis_semi = (semi[0] * 0.3, semi[1] * 0.22, semi[2] * 0.25)

    def value(env, sdf):
        return -70.0 + soft_edge(ellipsoid_sdf(to_local(env, pelvis_c, rot), pelvis_semi), 1.5) * 80.0

    r = max(sinus_semi)
    def sinus(env):
        return ellipsoid_sdf(to_local(env, c, rot), sinus_semi)

    return sdf_shape(f"{name}_hilum", c - r - 2, c + r + 2, sinus, value, _LABEL_ID[name], within=(_LABEL_ID[name],))


def _hollow_organs(pt: Patient, tex, spleen_centre: np.ndarray) -> dict:
    """Stomach, duodenum, pancreas and colon (tubes through patient-scaled control points)."""
    rng, u, s, sz, lv, y0 = pt.rng, pt.rng.uniform, pt.s, pt.sz, pt.level, pt.y_spine0
    wall_hu = pt.hu_muscle - 5.0

    def clip(e):
        return e.cavity_sdf() + 1.0

    # stomach: J-shaped, fundus under the left dome, antrum crossing to the pylorus; gas anteriorly (supine)
    control = np.array([
        [55 * s, y0 - 5 * s, lv["T10"] + 5 * sz],
        [65 * s, y0 - 40 * s, lv["T11"]],
        [55 * s, y0 - 85 * s, lv["T12"] - 10 * sz],
        [22 * s, y0 - 105 * s, lv["L1"] - 5 * sz],
        [-12 * s, y0 - 90 * s, lv["L1"]],
        [-28 * s, y0 - 75 * s, lv["L1"] + 2 * sz],
    ]) + rng.normal(0, 4.0, (6, 3))
    radius = np.array([36, 36, 30, 22, 15, 10]) * s * u(0.8, 1.15)
    control = pt.pull_inside(control, 0.6 * radius)
    stomach = Tube("stomach", control, radius, kind=[FOOD, AIR_FLUID, AIR_FLUID, AIR_FLUID, FLUID, FLUID],
                    hu=u(5.0, 25.0), wall_mm=4.0, wall_hu=wall_hu, level=control[:, 1] - radius * u(0.45, 0.85),
                    label=_LABEL_ID["stomach"], textures=tex, clip=clip).shape

    # duodenum: C-loop around the pancreatic head
    control = np.array([
        [-28 * s, y0 - 75 * s, lv["L1"] + 2 * sz],
        [-45 * s, y0 - 60 * s, lv["L1"] - 5 * sz],
        [-52 * s, y0 - 40 * s, lv["L2"]],
        [-48 * s, y0 - 40 * s, lv["L3"]],
        [-15 * s, y0 - 45 * s, lv["L3"] - 5 * sz],
        [20 * s, y0 - 48 * s, lv["L3"]],
        [30 * s, y0 - 55 * s, lv["L2"]],
    ]) + rng.normal(0, 2.0, (7, 3))
    control = pt.pull_inside(control, 12.0 * s)
    duodenum = Tube("duodenum", control, 11.0 * s, kind=[FLUID, GAS, FLUID, FLUID, FLUID, FLUID, FLUID],
                     hu=u(0.0, 20.0), wall_mm=2.5, wall_hu=wall_hu, label=_LABEL_ID["duodenum"], textures=tex).shape

    # pancreas: head in the duodenal C-loop, body across the aorta, tail to the splenic hilum
    control = np.array([
        [-32 * s, y0 - 50 * s, lv["L2"] + 5 * sz],
        [-10 * s, y0 - 62 * s, lv["L1"] - 5 * sz],
        [20 * s, y0 - 60 * s, lv["L1"]],
        [55 * s, y0 - 40 * s, lv["L1"] + 8 * sz],
        spleen_centre + np.array([-15 * s, -25 * s, -20 * sz]),
    ]) + rng.normal(0, 2.0, (5, 3))
    control = pt.pull_inside(control, 14.0 * s)
    pancreas = Tube("pancreas", control, np.array([16, 12, 11, 10, 8]) * s * u(0.85, 1.15), kind=SOLID,
                     hu=u(30.0, 45.0), label=_LABEL_ID["pancreas"], textures=tex).shape

    # colon: cecum in the right iliac fossa, ascending, transverse (sagging anteriorly), descending, sigmoid
    control = np.array([
        [-85 * s, y0 - 55 * s, pt.z_ls - 10],
        [-100 * s, y0 - 25 * s, lv["L4"]],
        [-105 * s, y0 - 15 * s, lv["L2"]],
        [-85 * s, y0 - 50 * s, lv["L1"] - 15 * sz],
        [-45 * s, y0 - 100 * s, lv["L2"] - 10 * sz],
        [0.0, y0 - 115 * s, lv["L3"]],
        [45 * s, y0 - 100 * s, lv["L2"]],
        [90 * s, y0 - 60 * s, lv["T12"]],
        [112 * s, y0 - 20 * s, lv["L2"]],
        [108 * s, y0 - 25 * s, lv["L4"]],
        [85 * s, y0 - 50 * s, pt.z_ls],
        [40 * s, y0 - 70 * s, pt.z_ls - 30],
        [0.0, y0 - 20 * s, pt.z_ls - 45],
    ]) + rng.normal(0, 4.0, (13, 3))
    radius = np.array([27, 24, 22, 22, 24, 24, 24, 22, 20, 19, 18, 17, 16]) * s * u(0.85, 1.15)
    control = pt.pull_inside(control, 0.8 * radius)
    kind = [int(k) for k in rng.choice([FECES, FECES, FECES, AIR_FLUID, AIR_FLUID, GAS], size=13)]
    kind[0] = FECES
    colon = Tube("colon", control, radius, kind=kind, hu=u(-60.0, 0.0), wall_mm=2.5, wall_hu=wall_hu,
                  level=control[:, 1] - radius * rng.uniform(0.3, 0.8, 13), label=_LABEL_ID["colon"],
                  textures=tex, haustra_mm=u(35.0, 50.0), clip=clip).shape
    return {"stomach": stomach, "duodenum": duodenum, "pancreas": pancreas, "colon": colon}


def _vessels(pt: Patient, tex) -> dict:
    """Aorta, inferior vena cava, iliac arteries and veins, and hepatic/portal veins inside the liver."""
    rng, u, s, lv = pt.rng, pt.rng.uniform, pt.s, pt.level

    def path(z_top, z_bottom, x_offset, y_offset, n=8):
        return np.array([[pt.spine_x(z) + x_offset, pt.spine_y(z) + y_offset, z]
                         for z in np.linspace(z_top, z_bottom, n)])

    def blood(name, control, radius, label):
        return Tube(name, control, radius, kind=SOLID, hu=pt.hu_blood, label=label, textures=tex).shape

    z_bif = lv["L4"] + u(0.0, 15.0)  # aortic bifurcation near L4
    r_aorta = u(9.0, 13.0) * s
    dy = -(pt.vertebrae[3].ry + r_aorta + 3.0)  # just anterior of the vertebral bodies
    vessels = {"aorta": blood("aorta", path(200.0, z_bif, u(8.0, 16.0) * s, dy), r_aorta, _LABEL_ID["aorta"]),
               "arteries": [], "veins": []}
    for side, artery, vein in ((1.0, "iliac_artery_left", "iliac_vena_left"),
                               (-1.0, "iliac_artery_right", "iliac_vena_right")):
        xs, ys = _spine_at(pt, z_bif)
        control = np.array([[xs + 10 * s, ys + dy, z_bif + 3],
                            [xs + side * 30 * s, ys + dy + 12, z_bif - 40],
                            [xs + side * 55 * s, ys + dy + 5, z_bif - 90],
                            [xs + side * 70 * s, ys + dy - 10, z_bif - 140]])
        vessels["arteries"].append(blood(artery, control, 0.6 * r_aorta, _LABEL_ID[artery]))
        zc = z_bif - 12
        xs, ys = _spine_at(pt, zc)
        control = np.array([[xs - 15 * s, ys + dy + 6, zc + 3],
                            [xs + side * 25 * s, ys + dy + 22, zc - 40],
                            [xs + side * 48 * s, ys + dy + 18, zc - 90],
                            [xs + side * 62 * s, ys + dy + 5, zc - 140]])
        vessels["veins"].append(blood(vein, control, 0.75 * r_aorta, _LABEL_ID[vein]))
    # IVC: right of the aorta, curving anteriorly into the liver above T12
    lower = path(lv["T12"], z_bif - 12, -u(18.0, 26.0) * s, dy + 4)
    upper = np.array([[pt.spine_x(z) - 22 * s, pt.spine_y(z) + dy - 6 - 0.5 * (z - lv["T12"]), z]
                      for z in np.linspace(200.0, lv["T12"] + 20, 4)])
    vessels["ivc"] = blood("ivc", np.vstack([upper, lower]), u(10.0, 13.0) * s, _LABEL_ID["inferior_vena_cava"])

    # hepatic veins (to the IVC) and portal branches: darker than liver without contrast, keep the liver label
    origin = np.array([pt.spine_x(lv["T10"]) - 20 * s, pt.spine_y(lv["T10"]) + dy - 30, lv["T10"]])
    branches = []
    for k in range(3):
        end = origin + np.array([-u(40, 100) * s + 50 * k * s, -u(20, 80) * s, -u(40, 90)])
        branches.append(np.array([origin, 0.5 * (origin + end) + rng.normal(0, 8, 3), end]))
    origin = np.array([-20 * s, pt.y_spine0 - 55 * s, lv["L1"] + 10])
    for k in range(2):
        end = origin + np.array([-u(40, 80) * s if k == 0 else u(20, 50) * s, -u(0, 40) * s, u(20, 60)])
        branches.append(np.array([origin, 0.5 * (origin + end) + rng.normal(0, 6, 3), end]))
    vessels["liver"] = [Tube("liver_vessel", c, np.array([7.0, 5.0, 2.5]) * s, kind=SOLID, hu=pt.hu_blood,
                              label=None, within=(_LABEL_ID["liver"],), textures=tex).shape for c in branches]
    return vessels


def _psoas(pt: Patient, tex) -> list[Shape]:
    """Psoas muscles from T12 downwards, growing, moving anterolaterally in the pelvis."""
    s, lv = pt.s, pt.level
    z_top = lv["T12"]
    r_max = pt.rng.uniform(17.0, 24.0) * s
    shapes = []
    for side, name in ((1.0, "iliopsoas_left"), (-1.0, "iliopsoas_right")):
        def psoas(env, side=side):
            t = np.clip((z_top - env.z) / (z_top - lv["L4"]), 0.0, 1.0)
            r = 3.0 + (r_max - 3.0) * t
            below = np.maximum(lv["L5"] - env.z, 0.0)
            cx = pt.spine_x(env.z) + side * ((18.0 + 7.0 * t) * s + r * 0.85 + 0.45 * below)
            cy = pt.spine_y(env.z) + 2.0 - 0.35 * below
            return np.maximum(ellipse_sdf(env.x - cx, env.y - cy, r * 1.05, r * 0.95), env.z - z_top)

        lo = np.array([min(0, side * 150), pt.y_spine0 - 120, -UNBOUNDED_MM])
        hi = np.array([max(0, side * 150), pt.y_spine0 + 40, z_top + 5])
        shapes.append(sdf_shape("psoas", lo, hi, psoas, _muscle_value(pt, tex), _LABEL_ID[name]))
    return shapes


def _spine(pt: Patient, tex) -> list[Shape]:
    """Intervertebral discs, vertebrae, the spinal canal (CSF and cord) and the sacrum."""
    u, s, lv = pt.rng.uniform, pt.s, pt.level
    shapes: list[Shape] = []
    for z_disc, thickness in pt.discs:
        v = min(pt.vertebrae, key=lambda vv: abs(vv.z - z_disc))

        def disc(env, z_disc=z_disc, thickness=thickness, v=v):
            x = env.x - pt.spine_x(env.z)
            y = env.y - pt.spine_y(env.z)
            return np.maximum(ellipse_sdf(x, y, v.rx * 0.98, v.ry * 0.98), np.abs(env.z - z_disc) - thickness / 2 - 1)

        c = np.array([0.0, float(pt.spine_y(z_disc)), z_disc])
        r = np.array([v.rx + 15, v.ry + 15, thickness + 5])
        shapes.append(sdf_shape("disc", c - r, c + r, disc, u(75.0, 100.0), None))
    shapes += [_vertebra_shape(pt, v, tex) for v in pt.vertebrae]

    cord_end = lv["L1"] - 0.5 * pt.period

    def canal_xy(env):
        ry = np.interp(env.z, [lv["L5"], lv["T7"]], [pt.vertebrae[0].ry, pt.vertebrae[-1].ry]).astype(np.float32)
        return env.x - pt.spine_x(env.z), env.y - pt.spine_y(env.z) - (ry + 9.0 * s + 2.0)

    def canal(env):
        x, y = canal_xy(env)
        return np.maximum(ellipse_sdf(x, y, 10.5 * s, 9.0 * s), pt.z_ls - env.z)

    def canal_value(env, sdf):
        x, y = canal_xy(env)
        cord = np.maximum(np.sqrt(x * x + y * y) - 4.5 * s, cord_end - env.z)
        return 8.0 + soft_edge(cord, 1.0) * 27.0  # CSF, and the cord above L1/L2

    shapes.append(sdf_shape("spinal_canal", np.array([-40, pt.y_spine0 - 20, pt.z_ls - 5]),
                              np.array([40, pt.y_spine0 + 70, UNBOUNDED_MM]), canal, canal_value,
                              _LABEL_ID["spinal_cord"]))

    # sacrum: below the L5/S1 disc, tilting posteriorly, with alae
    z_s1 = _sacrum_top(pt)

    def sacrum(env):
        x, y = env.x - pt.spine_x(env.z), env.y - _sacrum_centre_y(pt, env.z)
        body = ellipse_sdf(x, y + 4.0 * s, 26.0 * s, 18.0 * s)
        alae = ellipse_sdf(x, y - 8.0 * s, _sacrum_half_width(pt, env.z), 14.0 * s)
        return np.maximum(smooth_min(body, alae, 8.0), env.z - z_s1)

    bone = _bone_value(pt, tex)

    def sacrum_value(env, sdf):
        x, y = env.x - pt.spine_x(env.z), env.y - _sacrum_centre_y(pt, env.z)
        canal_sdf = ellipse_sdf(x, y - 12.0 * s, 11.0 * s, 5.0 * s)
        hu = bone(env, sdf)
        return hu + soft_edge(canal_sdf, 1.0) * (10.0 - hu)

    y_s1 = float(pt.spine_y(pt.z_ls))
    shapes.append(sdf_shape("sacrum", np.array([-80, y_s1 - 40, -UNBOUNDED_MM]), np.array([80, y_s1 + 100, z_s1 + 2]),
                              sacrum, sacrum_value, _LABEL_ID["sacrum"]))
    return shapes


def _sacrum_top(pt: Patient) -> float:
    return pt.z_ls - pt.discs[0][1] / 2


def _sacrum_centre_y(pt: Patient, z):
    return float(pt.spine_y(pt.z_ls)) + 5.0 + 0.55 * np.maximum(_sacrum_top(pt) - z, 0.0)


def _sacrum_half_width(pt: Patient, z):
    return (52.0 - 0.25 * np.maximum(_sacrum_top(pt) - z, 0.0)) * pt.s


def _iliac_wing_curve(pt: Patient, env: Env, side: float):
    """Control points (per point's z) of the iliac wing's axial section: sacroiliac joint, bow, front end."""
    below = np.maximum(pt.z_crest - env.z, 0.0)
    p1x = side * (_sacrum_half_width(pt, env.z) + 4.0) + pt.spine_x(env.z)
    p1y = _sacrum_centre_y(pt, env.z) + 8.0
    p2x = side * (pt.half_width_at(env.z) * 0.78 - pt.fat0 - 0.35 * below)
    p2y = pt.spine_y(env.z) - 45.0 * pt.s - 0.3 * below
    mx = 0.5 * (p1x + p2x) + side * 22.0
    my = 0.5 * (p1y + p2y) + 24.0
    return (p1x, p1y), (mx, my), (p2x, p2y)


def _pelvis(pt: Patient, tex) -> tuple[list[Shape], list[Shape]]:
    """Iliac wings (curved plates from the sacroiliac joints, below the crest) and the iliacus muscles."""
    u, s = pt.rng.uniform, pt.s
    wings, iliacus = [], []
    for side, name in ((1.0, "hip_left"), (-1.0, "hip_right")):
        crest_bump = u(5.0, 15.0)

        def wing(env, side=side, crest_bump=crest_bump):
            d, t = bezier_distance(env, *_iliac_wing_curve(pt, env, side))
            thickness = 6.0 + 8.0 * (1.0 - t) ** 2 + 3.0 * t**4 - 1.0 * np.sin(np.pi * t)
            crest = pt.z_crest + crest_bump * np.sin(np.pi * np.clip(t * 1.2, 0, 1))
            return np.maximum(d - thickness / 2, env.z - crest)

        lo = np.array([min(0, side * 200), pt.y_spine0 - 120, -UNBOUNDED_MM])
        hi = np.array([max(0, side * 200), pt.y_spine0 + 90, pt.z_crest + 20])
        wings.append(sdf_shape("iliac_wing", lo, hi, wing, _bone_value(pt, tex), _LABEL_ID[name]))

    # iliacus: muscle lining the inner (anteromedial) surface of each wing, labelled with the psoas
    for side, name in ((1.0, "iliopsoas_left"), (-1.0, "iliopsoas_right")):
        thickness = u(10.0, 16.0) * s

        def muscle(env, side=side, thickness=thickness):
            p1, pm, p2 = _iliac_wing_curve(pt, env, side)
            d, t = bezier_distance(env, p1, pm, p2)
            vx, vy = p2[0] - p1[0], p2[1] - p1[1]
            norm = np.sqrt(vx * vx + vy * vy) + 1e-6
            nx, ny = -vy / norm * side, vx / norm * side  # unit normal pointing anteromedially
            mid_x = 0.25 * p1[0] + 0.5 * pm[0] + 0.25 * p2[0]
            mid_y = 0.25 * p1[1] + 0.5 * pm[1] + 0.25 * p2[1]
            inner = (env.x - mid_x) * nx + (env.y - mid_y) * ny
            return np.maximum.reduce([d - thickness, -inner, env.z - (pt.z_crest - 3.0), 0.15 - t])

        lo = np.array([min(0, side * 200), pt.y_spine0 - 120, -UNBOUNDED_MM])
        hi = np.array([max(0, side * 200), pt.y_spine0 + 60, pt.z_crest + 5])
        iliacus.append(sdf_shape("iliacus", lo, hi, muscle, _muscle_value(pt, tex), _LABEL_ID[name]))
    return wings, iliacus


def _ribs(pt: Patient, tex) -> list[Shape]:
    """Ribs 7-12 from their vertebra around the wall, descending anteriorly; costal cartilages of ribs 7-10."""
    u, s, lv = pt.rng.uniform, pt.s, pt.level
    ends = {12: 1.25, 11: 1.75, 10: 2.3, 9: 2.4, 8: 2.5, 7: 2.6}  # angular extent from the spine (rad)

    def wall_point(phi, z, side):
        theta = np.pi / 2 - side * phi  # phi = 0 at the spine (posterior), pi at the front
        fat = float(pt._fat_at(np.float32(theta), np.float32(z)))
        return pt.skin_point(theta, z, fat + pt.muscle_mm * 0.6 + 1.0)

    shapes = []
    for number in range(7, 13):
        z_attach = lv[f"T{number}"] + 4.0
        drop = u(70.0, 95.0) * pt.sz
        phi_end = ends[number] + u(-0.1, 0.1)
        for side in (1.0, -1.0):
            name = f"rib_{'left' if side > 0 else 'right'}_{number}"
            points = np.array([wall_point(phi, z_attach - drop * (phi / np.pi) ** 1.2, side)
                               for phi in np.linspace(0.3, phi_end, 14)])
            points[0, 1] = min(points[0, 1], pt.spine_y(z_attach) + 35.0 * s)
            shapes.append(Tube("rib", points, (4.0 if number >= 11 else 5.0) * s, kind=BONE,
                                hu=pt.hu_cancellous * 0.7, label=_LABEL_ID[name], cortex_mm=1.5,
                                cortex_hu=pt.hu_cortical * 0.9).shape)
            if number <= 10:
                z_end = points[-1, 2]
                rise = 25.0 + 10.0 * (10 - number)
                cartilage = np.array([wall_point(phi, z_end + (phi - phi_end) / (2.95 - phi_end) * rise, side)
                                      for phi in np.linspace(phi_end, 2.95, 6)])
                shapes.append(Tube("costal_cartilage", cartilage, 4.5 * s, kind=SOLID, hu=u(90.0, 160.0),
                                    label=_LABEL_ID["costal_cartilages"], textures=tex).shape)
    return shapes


def _build_anatomy(pt: Patient) -> list[Shape]:
    """All shapes of patient ``pt`` in painting order (later shapes cover earlier ones)."""
    rng = pt.rng
    tex = {"fine": Texture(rng, 6.0, 8), "coarse": Texture(rng, 14.0, 6), "bubbles": Texture(rng, 8.0, 8)}
    table = _table(pt)
    wall = _body_wall(pt, tex)
    solid = _solid_organs(pt)
    hollow = _hollow_organs(pt, tex, solid["spleen_centre"])
    vessels = _vessels(pt, tex)
    psoas = _psoas(pt, tex)
    spine = _spine(pt, tex)
    wings, iliacus = _pelvis(pt, tex)
    ribs = _ribs(pt, tex)
    obstacles = ([hollow[k] for k in ("stomach", "duodenum", "pancreas", "colon")]
                 + [solid[k] for k in ("spleen", "liver", "gallbladder")] + solid["kidneys"] + psoas + iliacus
                 + [vessels["aorta"], vessels["ivc"]] + vessels["arteries"] + vessels["veins"] + spine + wings)
    small_bowel = _small_bowel(pt, tex, obstacles)
    return (table + wall + small_bowel
            + [hollow["colon"], hollow["duodenum"], hollow["stomach"], hollow["pancreas"], solid["liver"]]
            + vessels["liver"] + [solid["gallbladder"], solid["spleen"]]
            + solid["kidneys"] + solid["hila"] + psoas + iliacus
            + [vessels["ivc"]] + vessels["veins"] + [vessels["aorta"]] + vessels["arteries"]
            + spine + wings + ribs)


def _small_bowel(pt: Patient, tex, solid: list[Shape]) -> list[Shape]:
    """Small bowel loops: random self-avoiding walks on a bent lattice filling the free abdominal cavity."""
    rng, lv = pt.rng, pt.level
    radius = rng.uniform(10.0, 12.5) * pt.s
    step = 2.0 * radius + 2.0
    z_top = lv["L1"] - rng.uniform(0.0, 20.0)
    z_bottom = -160.0
    offset = rng.uniform(0.0, step, 3)
    xs = np.arange(-200.0, 200.0, step) + offset[0]
    ys = np.arange(-200.0, 200.0, step) + offset[1]
    zs = np.arange(z_bottom, z_top, step) + offset[2]
    gx, gy, gz = np.meshgrid(xs, ys, zs, indexing="ij")
    # bend the lattice with a smooth random warp and jitter it, so that the loops do not look like a grid
    warps = [Texture(rng, 70.0, 4) for _ in range(3)]
    nodes = np.stack([gx.ravel(), gy.ravel(), gz.ravel()], axis=1).astype(np.float32)
    bent = nodes.copy()
    for a in range(3):
        bent[:, a] += 0.3 * step * warps[a](nodes[:, 0], nodes[:, 1], nodes[:, 2])
    bent += rng.uniform(-0.12 * step, 0.12 * step, bent.shape).astype(np.float32)
    env = Env(pt, bent[:, 0].copy(), bent[:, 1].copy(), bent[:, 2].copy())
    ok = env.cavity_sdf() < -0.3 * radius  # loops may touch the wall (they are clipped to the cavity)
    points = np.stack([env.x, env.y, env.z], axis=1)
    for shape in solid:  # keep the lattice nodes out of the other organs
        inside_box = np.all((points >= shape.lo) & (points <= shape.hi), axis=1)
        idx = np.flatnonzero(ok & inside_box)
        if idx.size:
            sd = shape.sdf(env.subset(idx))
            ok[idx[sd < 0.2 * radius]] = False
    shape3 = gx.shape
    free = ok.reshape(shape3)
    visited = ~free
    moves = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
    walks = []
    candidates = [tuple(c) for c in np.argwhere(free)]
    order = rng.permutation(len(candidates))
    for o in order:
        start = candidates[o]
        if visited[start]:
            continue
        path = [start]
        visited[start] = True
        last = None
        while len(path) < 30:
            cur = path[-1]
            opts = []
            for m in moves:
                nb = (cur[0] + m[0], cur[1] + m[1], cur[2] + m[2])
                if all(0 <= nb[a] < shape3[a] for a in range(3)) and not visited[nb]:
                    opts.append((m, nb))
            if not opts:
                break
            straight = [o2 for o2 in opts if o2[0] == last]
            if straight and rng.random() < 0.25:
                m, nb = straight[0]
            else:
                m, nb = opts[rng.integers(len(opts))]
            visited[nb] = True
            path.append(nb)
            last = m
        if len(path) >= 2:
            walks.append(path)
    tubes = []
    bent = bent.reshape(*shape3, 3)
    for path in walks:
        idx = np.array(path)
        ctrl = bent[idx[:, 0], idx[:, 1], idx[:, 2]].astype(np.float64)
        n = len(ctrl)
        kinds = rng.choice([FLUID, SOLID, AIR_FLUID, GAS], p=[0.5, 0.3, 0.12, 0.08], size=n)
        r = radius * rng.uniform(0.75, 1.0) * rng.uniform(0.9, 1.1, n)
        r[kinds == SOLID] *= 0.75  # collapsed loops
        hu = np.where(kinds == SOLID, pt.hu_muscle - 10.0, rng.uniform(0.0, 25.0, n))
        level = ctrl[:, 1] - r * rng.uniform(-0.2, 0.5, n)
        tubes.append(Tube("small_bowel", ctrl, r, kind=kinds, hu=hu, wall_mm=2.0, wall_hu=pt.hu_muscle - 5,
                           level=level, label=_LABEL_ID["small_bowel"], textures=tex,
                           clip=lambda e: e.cavity_sdf() + 1.0).shape)
    return tubes


# ----------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------


def phantom_grid(
    spacing_mm: float | Sequence[float] = 2.0,
    direction: Sequence[float] | None = None,
    fov_mm: Sequence[float] = PHANTOM_FOV_MM,
) -> Grid:
    """The phantom's grid: ``fov_mm`` (mm along the grid's own axes) centred on the LPS origin.

    ``spacing_mm`` is one value (isotropic) or ``(x, y, z)`` in mm; ``direction`` is a row-major 3x3 direction
    matrix (identity when ``None``; oblique and flipped directions are allowed).
    """
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,)).copy()
    if np.any(spacing <= 0) or not np.all(np.isfinite(spacing)):
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64).reshape(3, 3)
    if abs(abs(np.linalg.det(d)) - 1.0) > 1e-3 or not np.allclose(d.T @ d, np.eye(3), atol=1e-3):
        raise ValueError("direction must be an orthonormal 3x3 matrix (9 values, row-major)")
    size = np.maximum(np.round(np.asarray(fov_mm, dtype=np.float64) / spacing).astype(int), 2)
    origin = -d @ ((size - 1) / 2.0 * spacing)
    return Grid(size=tuple(int(v) for v in size), spacing=tuple(float(v) for v in spacing),
                origin=tuple(float(v) for v in origin), direction=tuple(float(v) for v in d.ravel()))


def render_phantom(
    seed: int = 0,
    spacing_mm: float | tuple[float, float, float] = 2.0,
    *,
    direction: Sequence[float] | None = None,
) -> tuple[sitk.Image, sitk.Image]:
    """Render phantom patient ``seed``: the noise-free CT (``sitkFloat32``, HU) and its labels (``sitkUInt8``).

    Both images share one grid (:func:`phantom_grid`): ``spacing_mm`` is isotropic or ``(x, y, z)`` mm, e.g.
    ``(0.8, 0.8, 2.5)`` for a clinical 500 x 450 x 120 scan; ``direction`` (row-major 3x3) defaults to identity.
    The anatomy is generated in physical LPS coordinates, so it is the same physically for any spacing or
    direction.  Label ids: :data:`PHANTOM_LABELS`.  Add scanner noise with :func:`add_ct_noise`.
    """
    grid = phantom_grid(spacing_mm, direction)
    patient = Patient(int(seed), np.random.default_rng([int(seed), 20240611]))
    shapes = _build_anatomy(patient)
    canvas = Canvas(grid, patient)
    for shape in shapes:
        canvas.paint(shape)
    image = grid.image_from_array(canvas.hu)
    labels = grid.image_from_array(canvas.labels)
    return image, labels


def add_ct_noise(image: sitk.Image, seed: int, sigma_hu: float = 15.0) -> sitk.Image:
    """Add slightly correlated Gaussian noise (standard deviation ``sigma_hu`` HU) and return int16 HU.

    The noise is white Gaussian noise smoothed over about one voxel and rescaled to ``sigma_hu``; the result is
    rounded and clipped to the CT range [-1024, 3071] HU (``sitkInt16``, same grid as ``image``).
    """
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    rng = np.random.default_rng([int(seed), 7919])
    noise = rng.standard_normal(array.shape, dtype=np.float32)
    if sigma_hu > 0:
        from scipy.ndimage import gaussian_filter

        noise = gaussian_filter(noise, sigma=0.6, mode="wrap")
        noise *= np.float32(sigma_hu / max(float(noise.std()), 1e-6))
        array += noise
    out = sitk.GetImageFromArray(np.clip(np.rint(array), -1024, 3071).astype(np.int16))
    out.CopyInformation(image)
    return out
