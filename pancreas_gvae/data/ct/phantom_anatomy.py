"""The phantom's anatomy: organs as ellipsoids in body-normalised coordinates, drawn per slice with their HU.

:func:`build_anatomy` draws one case's layout from its RNG; :func:`render_slice` paints one axial slice (HU
image and pancreas mask) at a position along the scanned range; :func:`gauss_kernel` / :func:`smooth` are
the in-plane smoothing. Which organs, where and with what HU: see :mod:`pancreas_gvae.data.ct.phantom`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class _Ellipsoid:
    """An ellipsoid in body-normalised coordinates: u (patient left +), v (posterior +), t (0 cranial .. 1 caudal).

    ``rt = inf`` makes it a cylinder along z, limited to ``t_min .. t_max``.
    """

    u: float
    v: float
    t: float
    ru: float
    rv: float
    rt: float = math.inf
    rot: float = 0.0
    t_min: float = -math.inf
    t_max: float = math.inf

    def section(self, t: float) -> float:
        """Squared scale of the cross-section at ``t`` (<= 0: not cut)."""
        if not self.t_min <= t <= self.t_max:
            return 0.0
        return 1.0 if math.isinf(self.rt) else 1.0 - ((t - self.t) / self.rt) ** 2

    def scaled(self, k: float, kt: float | None = None) -> _Ellipsoid:
        return _Ellipsoid(self.u, self.v, self.t, self.ru * k, self.rv * k, self.rt * (k if kt is None else kt),
                          self.rot, self.t_min, self.t_max)


@dataclass(frozen=True)
class _Paint:
    """Set ``hu`` inside ``shape``; ``clip``: keep inside "cavity" or "inner" body; ``v_max``: cut posteriorly."""

    shape: _Ellipsoid
    hu: float
    clip: str | None = "cavity"
    v_max: float | None = None


class _Frame:
    """Pixel grid <-> body-normalised coordinates for one case (rotation and body size included)."""

    def __init__(self, size: int, dx: float, center_rc: tuple[float, float], a: float, b: float, theta: float):
        self.size, self.dx, self.a, self.b = size, dx, a, b
        self.rc, self.cc = center_rc
        self.cos, self.sin = math.cos(theta), math.sin(theta)
        idx = np.arange(size, dtype=np.float32)
        y = ((idx - self.rc) * dx)[:, None]  # mm, posterior +
        x = ((idx - self.cc) * dx)[None, :]  # mm, patient left +
        self.u = ((self.cos * x + self.sin * y) / a).astype(np.float32)
        self.v = ((-self.sin * x + self.cos * y) / b).astype(np.float32)
        q = self.u**2 + self.v**2
        self.body, self.inner, self.cavity = q <= 1.0, q <= 0.90**2, q <= 0.84**2
        self.x_mm, self.y_mm = x, y  # unrotated, for the table

    def bbox(self, e: _Ellipsoid, f: float) -> tuple[slice, slice] | None:
        ua, vb = e.u * self.a, e.v * self.b
        col = self.cc + (self.cos * ua - self.sin * vb) / self.dx
        row = self.rc + (self.sin * ua + self.cos * vb) / self.dx
        r = math.sqrt(f) * max(e.ru, e.rv) * max(self.a, self.b) / self.dx + 2
        r0, r1 = max(int(row - r), 0), min(int(row + r) + 1, self.size)
        c0, c1 = max(int(col - r), 0), min(int(col + r) + 1, self.size)
        return (slice(r0, r1), slice(c0, c1)) if r0 < r1 and c0 < c1 else None

    def inside(self, e: _Ellipsoid, f: float, bb: tuple[slice, slice]) -> np.ndarray:
        du, dv = self.u[bb] - e.u, self.v[bb] - e.v
        if e.rot:
            c, s = math.cos(e.rot), math.sin(e.rot)
            du, dv = c * du + s * dv, -s * du + c * dv
        return (du / e.ru) ** 2 + (dv / e.rv) ** 2 <= f


@dataclass
class _Anatomy:
    frame: _Frame
    base: np.ndarray  # float32 slice: air, table, body wall, soft-tissue background
    paints: list[_Paint]
    pancreas: list[_Ellipsoid]
    pancreas_hu: float
    noise_hu: float


def _chain(points: list[tuple[float, ...]], per_segment: int = 6) -> list[_Ellipsoid]:
    """Ellipsoids along a polyline of (u, v, t, ru, rv, rt) control points, dense enough to overlap."""
    out: list[_Ellipsoid] = []
    for p, q in zip(points[:-1], points[1:]):
        for w in np.linspace(0.0, 1.0, per_segment, endpoint=False):
            out.append(_Ellipsoid(*(float(a + w * (b - a)) for a, b in zip(p, q))))
    out.append(_Ellipsoid(*points[-1]))
    return out


def build_anatomy(rng: np.random.Generator, size: int, dx: float) -> _Anatomy:
    fov = size * dx
    # The field of view is chosen to fit the patient, so the body scales with it (a: left-right, b: AP).
    a = fov * 0.40 * rng.uniform(0.92, 1.04)
    b = a * rng.uniform(0.68, 0.78)
    # Body centre a little anterior of the image centre (the table is below it).
    center = (size / 2 - 0.04 * size + rng.uniform(-0.01, 0.01) * size, size / 2 + rng.uniform(-0.015, 0.015) * size)
    frame = _Frame(size, dx, center, a, b, math.radians(rng.uniform(-5.0, 5.0)))

    def e(x_mm: float, y_mm: float, t: float, rx_mm: float, ry_mm: float, rt: float = math.inf, **kw) -> _Ellipsoid:
        return _Ellipsoid(x_mm / a, y_mm / b, t, rx_mm / a, ry_mm / b, rt, **kw)

    def j(scale_mm: float = 4.0) -> float:
        return float(rng.uniform(-scale_mm, scale_mm))

    base = np.full((size, size), -1000.0, dtype=np.float32)
    table_top = b * 1.06  # the table sits just under the back (unrotated)
    table = (frame.y_mm >= table_top) & (frame.y_mm <= table_top + 6.0) & (np.abs(frame.x_mm) <= 0.45 * fov)
    base[table] = 120.0
    base[frame.body] = -100.0 + j(10)
    base[frame.inner] = 50.0
    base[frame.cavity] = 35.0

    paints: list[_Paint] = []
    add = paints.append

    # Bowel loops fill the anterior abdomen (painted first: organs override them).
    for _ in range(12):
        loop = e(rng.uniform(-0.55, 0.6) * a, rng.uniform(-0.72, -0.15) * b, rng.uniform(0.2, 1.1),
                 r := rng.uniform(9, 14), r, rng.uniform(0.15, 0.35))
        add(_Paint(loop, 40.0))
        add(_Paint(loop.scaled(0.7, 0.9), -850.0 if rng.random() < 0.35 else 15.0))

    vb_y = 0.50 * b + j(3)  # vertebral body centre
    aorta = (8.0 + j(3), vb_y - 30.0 + j(2))

    # Retroperitoneal fat around the spine, great vessels and kidneys.
    add(_Paint(e(0, vb_y + 5, 0.5, 0.62 * a, 42), -85.0))

    # Kidneys in perirenal fat; the left (patient's left, +x) sits higher than the right. Their frontal
    # plane turns ~35 deg from coronal, so the hilum faces anteromedially.
    for side, t_c in ((1.0, 0.60), (-1.0, 0.68)):
        kid = e(side * (55 + j(5)), vb_y + 5 + j(4), t_c + j(0.04), 26 * rng.uniform(0.9, 1.1),
                17 * rng.uniform(0.9, 1.1), 0.36, rot=side * math.radians(35))
        add(_Paint(kid.scaled(1.3, 1.15), -90.0))
        add(_Paint(kid, 170.0 + j(15)))
        add(_Paint(kid.scaled(0.65, 0.9), 120.0))
        add(_Paint(e(side * (42 + j(2)), vb_y - 4, t_c, 7, 7, 0.15), -50.0))  # renal sinus fat at the hilum

    # Liver on the patient's right (image left), a left lobe across the midline anteriorly.
    liver_hu = 100.0 + j(10)
    k_liver = rng.uniform(0.92, 1.08)
    add(_Paint(e(-0.50 * a + j(), -0.05 * b + j(), 0.10, 0.45 * a * k_liver, 0.70 * b * k_liver, 0.75), liver_hu))
    add(_Paint(e(-0.05 * a + j(), -0.45 * b + j(), 0.05, 0.32 * a * k_liver, 0.25 * b * k_liver, 0.40), liver_hu))
    for _ in range(5):  # portal / hepatic vessel branches
        add(_Paint(e(rng.uniform(-0.7, -0.25) * a, rng.uniform(-0.4, 0.3) * b, rng.uniform(0, 0.6),
                     r := rng.uniform(3, 6), r, 0.1), 160.0, clip="cavity"))
    add(_Paint(e(-0.38 * a + j(), -0.30 * b + j(), 0.55 + j(0.04), 14, 11, 0.14), 10.0))  # gallbladder

    # Spleen posterolateral left, tilted along the ribs.
    add(_Paint(e(0.60 * a + j(), 0.32 * b + j(), 0.18 + j(0.04), 0.17 * a, 0.34 * b, 0.38,
                 rot=math.radians(28)), 115.0 + j(10)))

    # Stomach anterior left: wall, fluid, and gas that rises anteriorly (patient supine).
    stomach = e(0.28 * a + j(), -0.40 * b + j(), 0.08, 0.22 * a, 0.18 * b, 0.42)
    add(_Paint(stomach, 45.0))
    add(_Paint(stomach.scaled(0.78, 0.95), 15.0))
    add(_Paint(stomach.scaled(0.78, 0.95), -900.0, v_max=stomach.v - 0.04))

    # Muscles next to the spine: paraspinal (all slices) and psoas (growing caudally).
    arch_y = vb_y + 27.0
    for side in (1.0, -1.0):
        add(_Paint(e(side * 34, arch_y + 10, 0.5, 28, 26), 50.0, clip="inner"))
        add(_Paint(e(side * 30, vb_y + 2, 1.15, 13, 14, 0.65), 50.0))

    # Pancreas: control points in mm relative to the aorta, head (lower) -> tail (higher, to the spleen).
    k_p = rng.uniform(0.85, 1.2)
    dpx, dpy, dpt = j(6), j(5), j(0.04)
    ax, ay = aorta
    ctrl_mm = [  # x, y, t, rx, ry, rt
        (-42, -22, 0.66, 16, 14, 0.12),
        (-28, -12, 0.70, 8, 7, 0.07),  # uncinate process, behind the SMV
        (-12, -38, 0.58, 10, 8, 0.10),  # neck, in front of the SMV / SMA
        (20, -36, 0.50, 10, 9, 0.10),
        (48, -22, 0.43, 10, 9, 0.09),
        (68, -8, 0.37, 9, 8, 0.08),  # tail, at the splenic hilum
    ]
    order = [0, 2, 3, 4, 5]  # main chain; the uncinate hangs off the head
    pts = {i: ((ax + x + dpx + j(3)) / a, (ay + y + dpy + j(3)) / b, t + dpt + j(0.015),
               rx * k_p / a, ry * k_p / b, rt * rng.uniform(0.9, 1.1))
           for i, (x, y, t, rx, ry, rt) in enumerate(ctrl_mm)}
    pancreas = _chain([pts[i] for i in order]) + _chain([pts[0], pts[1]], per_segment=3)
    for p in pancreas:  # a fat halo separates it from its neighbours
        add(_Paint(p.scaled(1.6, 1.2), -80.0))

    # Duodenum: the C-loop hugging the head on the patient's right.
    head = pancreas[0]
    duo = _Ellipsoid(head.u - (head.ru * a + 9) / a, head.v + 2 / b, head.t + 0.02, 10 / a, 13 / b, 0.18)
    add(_Paint(duo, 45.0))
    add(_Paint(duo.scaled(0.6, 0.95), 5.0))

    # Spine: vertebral body (cortex + cancellous), posterior arch with canal, spinous and transverse processes.
    add(_Paint(e(0, vb_y, 0.5, 18, 17), 700.0, clip=None))
    add(_Paint(e(0, vb_y, 0.5, 15.5, 14.5), 280.0 + j(40), clip=None))
    add(_Paint(e(0, arch_y, 0.5, 30, 5), 450.0, clip=None))
    add(_Paint(e(0, arch_y, 0.5, 13, 12), 500.0, clip=None))
    add(_Paint(e(0, arch_y, 0.5, 8, 8), 20.0, clip=None))
    add(_Paint(e(0, arch_y + 22, 0.5, 4, 12), 500.0, clip=None))

    # Vessels (portal-venous phase).
    add(_Paint(e(ax, ay, 0.5, 11, 11), 170.0 + j(15)))
    add(_Paint(e(-28, vb_y - 28 + j(2), 0.5, 14, 10), 125.0))  # IVC
    sma = (ax, ay - 21)
    add(_Paint(e(*sma, 0.5, 4, 4, t_min=pts[3][2] - 0.08), 165.0))
    smv = (ax - 14, ay - 21)
    add(_Paint(e(*smv, 0.5, 6, 6, t_min=pts[2][2] - 0.02), 160.0))
    for p in _chain([(smv[0] / a, smv[1] / b, pts[2][2] - 0.02, 7 / a, 7 / b, 0.06),
                     (-0.32, -0.05, pts[2][2] - 0.30, 8 / a, 8 / b, 0.06)], per_segment=8):
        add(_Paint(p, 160.0))  # portal vein toward the liver hilum
    for p in _chain([(pts[i][0], pts[i][1] + 1.1 * pts[i][4], pts[i][2], 3.5 / a, 3.5 / b, 0.05)
                     for i in (2, 3, 4, 5)], per_segment=12):
        add(_Paint(p, 150.0))  # splenic vein along the back of the pancreas

    # Ribs around the lower chest wall; anterior ones end higher up.
    for deg in (-60, -35, -10, 15, 40, 65, 115, 140, 165, 195, 220, 245):
        phi = math.radians(deg)
        t_end = 0.40 if math.sin(phi) < 0 else 0.75
        rib = _Ellipsoid(0.87 * math.cos(phi), 0.87 * math.sin(phi), 0.5, 6 / a, 6 / b,
                         t_max=t_end + j(0.08))
        add(_Paint(rib, 450.0, clip=None))

    return _Anatomy(frame, base, paints, pancreas, 100.0 + j(10), float(rng.uniform(10.0, 18.0)))


def gauss_kernel(sigma_px: float) -> np.ndarray:
    if sigma_px < 0.2:
        return np.ones(1, dtype=np.float32)
    r = max(1, math.ceil(3 * sigma_px))
    w = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma_px) ** 2)
    return (w / w.sum()).astype(np.float32)


def smooth(img: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable in-plane convolution with edge padding (numpy only)."""
    r = len(w) // 2
    if r == 0:
        return img
    n = img.shape[0]
    for axis in (0, 1):
        p = np.pad(img, [(r, r) if ax == axis else (0, 0) for ax in (0, 1)], mode="edge")
        img = sum(wi * (p[i:i + n] if axis == 0 else p[:, i:i + n]) for i, wi in enumerate(w))
    return img


def render_slice(anat: _Anatomy, t: float) -> tuple[np.ndarray, np.ndarray]:
    fr = anat.frame
    img = anat.base.copy()
    for p in anat.paints:
        f = p.shape.section(t)
        if f <= 0 or (bb := fr.bbox(p.shape, f)) is None:
            continue
        m = fr.inside(p.shape, f, bb)
        if p.clip:
            m &= (fr.cavity if p.clip == "cavity" else fr.inner)[bb]
        if p.v_max is not None:
            m &= fr.v[bb] <= p.v_max
        img[bb][m] = p.hu
    mask = np.zeros(img.shape, dtype=bool)
    for e in anat.pancreas:
        f = e.section(t)
        if f > 0 and (bb := fr.bbox(e, f)) is not None:
            mask[bb] |= fr.inside(e, f, bb)
    mask &= fr.cavity
    img[mask] = anat.pancreas_hu
    return img, mask
