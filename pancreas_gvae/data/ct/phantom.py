"""Synthetic abdominal CT phantom cohort laid out like the NIH / TCIA Pancreas-CT download.

This is the project's embedded default data: it lets every pipeline run end to end (and its tests
pass) without the real collection. :func:`make_phantom_cohort` writes::

    OUT/Pancreas-CT/PANCREAS_0001/01-01-2000-PANCREAS0001-Pancreas-<5>/Pancreas-<5>/1-001.dcm ...
    OUT/TCIA_pancreas_labels-02-05-2017/label0001.nii.gz

(``<5>``: the last five digits of the study / series UID, as the NBIA retriever names folders.)

DICOM series
    CT Image Storage, explicit VR little endian, one file per slice, ``1-NNN.dcm`` with NNN the
    InstanceNumber. Instance 1 is the cranial end and ImagePositionPatient z *decreases* by the slice
    interval with each instance (a head-first, cranio-caudal scan); orientation axial
    ``[1, 0, 0, 0, 1, 0]``, so in the usual display the patient's right is on the image's left and
    anterior is at the top. Stored value = HU + 1024 (RescaleIntercept -1024, slope 1), clipped to
    0..4095; odd case numbers store uint16 / BitsStored 12 ("SIEMENS"), even ones int16 / BitsStored 16
    ("Philips"). UIDs are derived from (seed, case, role), so the same seed gives byte-identical files
    (with the same numpy version: numpy does not promise identical random streams across releases).

Geometry per case
    In-plane spacing: a 512-pixel equivalent ``s512`` is drawn from 0.66-0.98 mm (the collection's
    range) and the written spacing is ``s512 * 512 / size`` (via a whole-mm field of view), so a small
    phantom covers the same body as a 512 x 512 scan; at ``size=512`` it is exactly 0.66-0.98 mm.
    Slice thickness is one of 1.5 / 2.0 / 2.5 mm; the slice interval equals the thickness unless
    ``slice_interval`` is given. Default slice count: ``round(80 mm / interval)`` (32-53 slices), a
    short abdominal slab that keeps CPU runs fast; ``slices`` overrides it. The anatomy is laid out
    along the *scanned range* (normalised 0 = cranial end, 1 = caudal end), so the pancreas covers
    roughly the middle 40-55 % of the slices whatever their number.

Label NIfTI (as the NIH labels: binary uint8 on the same ``size x size x D`` grid as the series)
    Array axes ``(i, j, k)`` = (DICOM column, DICOM row, slice) with ``k = 0`` the *caudal* end,
    i.e. ``label[i, j, k] == mask[D - 1 - k, j, i]`` where ``mask`` is ``(instance, row, column)``.
    Affine (RAS, qform and sform code 1), with ``(x0, y0)`` the DICOM ImagePositionPatient x, y (LPS),
    ``dx`` the pixel spacing, ``dz`` the slice interval and ``z_caudal`` the z of the last instance::

        [[-dx,   0,  0, -x0      ],
         [  0, -dx,  0, -y0      ],
         [  0,   0, dz,  z_caudal],
         [  0,   0,  0,  1       ]]      (axis codes L, P, S)

    This is exactly the world geometry ITK / nibabel derive from the DICOM series (LPS -> RAS flips
    x and y), so pairing image and label in world coordinates is exact; see
    :meth:`PhantomGeometry.label_affine` and :func:`mask_to_label_array`.

Anatomy (HU, portal-venous phase): air -1000, a CT table, subcutaneous fat -100, abdominal wall muscle
50, soft-tissue background 35 with bowel loops (fluid or gas), liver ~100 with a gallbladder, spleen
~115, stomach (wall, fluid, gas), kidneys (cortex ~170, medulla ~120, sinus fat), psoas and paraspinal
muscles, vertebra (cortex 700, cancellous 280, canal, posterior arch), ribs, aorta ~170, IVC, SMA,
SMV/portal vein, splenic vein, duodenum, and a pancreas (~100 HU; head right of the SMV near the
duodenum and lower, tail toward the splenic hilum and higher) in a fat halo. Positions, sizes and the
in-plane rotation vary with the seed; correlated Gaussian noise of 10-18 HU and a ~0.6 mm smoothing
(scaled to the pixel size) follow. Case ``n`` depends only on ``(seed, n)``, not on ``start_index``.
"""

from __future__ import annotations

import gzip
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pancreas_gvae.errors import PipelineError

COLLECTION_DIR = "Pancreas-CT"
LABEL_DIR = "TCIA_pancreas_labels-02-05-2017"
DEFAULT_BODY_LENGTH_MM = 80.0
RESCALE_INTERCEPT = -1024
_MIN_SIZE, _MAX_SIZE = 32, 2048
_MIN_SLICES = 8
_SMOOTH_SIGMA_MM = 0.6
_STUDY_DATE = "20000101"  # an obviously synthetic date; the folder name repeats it as 01-01-2000


def case_id(index: int) -> str:
    """TCIA-style de-identified ID of case ``index``: 1 -> ``PANCREAS_0001``."""
    return f"PANCREAS_{index:04d}"


def label_path(out_dir: str | Path, index: int) -> Path:
    """Where the NIH-style label of case ``index`` lives under a cohort folder."""
    return Path(out_dir) / LABEL_DIR / f"label{index:04d}.nii.gz"


@dataclass(frozen=True)
class PhantomGeometry:
    """Voxel grid of one series. ``origin``: LPS mm of pixel (row 0, column 0) of instance 1."""

    size: int
    slices: int
    pixel_spacing: float
    slice_thickness: float
    slice_interval: float
    origin: tuple[float, float, float]

    def position(self, instance: int) -> tuple[float, float, float]:
        """ImagePositionPatient (LPS mm) of 1-based ``instance``; z falls toward the feet."""
        x, y, z = self.origin
        return (x, y, round(z - (instance - 1) * self.slice_interval, 4))

    def label_affine(self) -> np.ndarray:
        """RAS affine of the label array (axes column, row, caudal-to-cranial slice)."""
        x0, y0, _ = self.origin
        dx, dz = self.pixel_spacing, self.slice_interval
        z_caudal = self.position(self.slices)[2]
        return np.array([[-dx, 0, 0, -x0], [0, -dx, 0, -y0], [0, 0, dz, z_caudal], [0, 0, 0, 1]], dtype=float)


@dataclass
class PhantomCase:
    """One rendered case: ``hu`` int16 and ``mask`` uint8, both ``(instance, row, column)``."""

    index: int
    seed: int
    geometry: PhantomGeometry
    hu: np.ndarray
    mask: np.ndarray
    manufacturer: str
    patient_sex: str

    @property
    def case_id(self) -> str:
        return case_id(self.index)

    def pancreas_instances(self) -> range:
        """1-based instance numbers that hold pancreas (a contiguous range by construction)."""
        hit = np.flatnonzero(self.mask.reshape(self.mask.shape[0], -1).any(axis=1))
        return range(int(hit[0]) + 1, int(hit[-1]) + 2) if hit.size else range(0)


def mask_to_label_array(mask: np.ndarray) -> np.ndarray:
    """``(instance, row, column)`` mask -> NIfTI label array ``(column, row, slice caudal->cranial)``."""
    return np.ascontiguousarray(mask[::-1].transpose(2, 1, 0)).astype(np.uint8)


# --------------------------------------------------------------------------- anatomy primitives


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


def _build_anatomy(rng: np.random.Generator, size: int, dx: float) -> _Anatomy:
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


def _gauss_kernel(sigma_px: float) -> np.ndarray:
    if sigma_px < 0.2:
        return np.ones(1, dtype=np.float32)
    r = max(1, math.ceil(3 * sigma_px))
    w = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma_px) ** 2)
    return (w / w.sum()).astype(np.float32)


def _smooth(img: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable in-plane convolution with edge padding (numpy only)."""
    r = len(w) // 2
    if r == 0:
        return img
    n = img.shape[0]
    for axis in (0, 1):
        p = np.pad(img, [(r, r) if ax == axis else (0, 0) for ax in (0, 1)], mode="edge")
        img = sum(wi * (p[i:i + n] if axis == 0 else p[:, i:i + n]) for i, wi in enumerate(w))
    return img


def _render_slice(anat: _Anatomy, t: float) -> tuple[np.ndarray, np.ndarray]:
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


# --------------------------------------------------------------------------- rendering and writing


def _check(*, size: int, slices: int | None, slice_interval: float | None) -> None:
    if not _MIN_SIZE <= size <= _MAX_SIZE:
        raise PipelineError(f"phantom size must be {_MIN_SIZE}..{_MAX_SIZE} pixels, got {size}")
    if slices is not None and slices < _MIN_SLICES:
        raise PipelineError(f"phantom needs at least {_MIN_SLICES} slices (pancreas on a subset), got {slices}")
    if slice_interval is not None and not 0.1 <= slice_interval <= 10.0:
        raise PipelineError(f"slice interval must be 0.1..10 mm, got {slice_interval}")


def render_phantom_case(index: int, *, size: int = 64, slices: int | None = None, seed: int = 0,
                        slice_interval: float | None = None) -> PhantomCase:
    """Render case ``index`` in memory (deterministic in ``(seed, index)``); nothing is written."""
    _check(size=size, slices=slices, slice_interval=slice_interval)
    rng = np.random.default_rng([seed, index])
    fov_mm = round(rng.uniform(0.66, 0.98) * 512)  # whole-mm field of view, as scanners choose it
    dx = float(f"{fov_mm / size:.10g}")
    thickness = float(rng.choice([1.5, 2.0, 2.5]))
    interval = float(slice_interval) if slice_interval is not None else thickness
    n = slices if slices is not None else max(_MIN_SLICES, round(DEFAULT_BODY_LENGTH_MM / interval))
    half = (size - 1) / 2 * dx
    origin = (round(-half + rng.uniform(-5, 5), 4), round(-half + rng.uniform(-40, 10), 4),
              round(rng.uniform(-250, 50), 1))
    geom = PhantomGeometry(size, n, dx, thickness, interval, origin)
    sex = "M" if rng.random() < 0.66 else "F"
    anat = _build_anatomy(rng, size, dx)

    kernel = _gauss_kernel(_SMOOTH_SIGMA_MM / dx)
    noise_gain = anat.noise_hu / float((kernel**2).sum())  # smoothing shrinks white noise by sum(w^2)
    hu = np.empty((n, size, size), dtype=np.int16)
    mask = np.empty((n, size, size), dtype=np.uint8)
    for k in range(n):
        img, m = _render_slice(anat, (k + 0.5) / n)
        img += rng.standard_normal(img.shape, dtype=np.float32) * noise_gain
        img = _smooth(img, kernel)
        hu[k] = np.clip(np.rint(img), RESCALE_INTERCEPT, 4095 + RESCALE_INTERCEPT)
        mask[k] = m
    manufacturer = "SIEMENS" if index % 2 else "Philips"
    return PhantomCase(index, seed, geom, hu, mask, manufacturer, sex)


def _uid(case: PhantomCase, *role: object) -> str:
    return generate_uid(entropy_srcs=["pancreas-gvae-phantom", str(case.seed), str(case.index), *map(str, role)])


def _ds(value: float) -> str:
    """Decimal string of at most 16 characters (DICOM DS)."""
    s = f"{value:.10g}"
    return "0" if s in ("-0", "") else s


def _slice_dataset(case: PhantomCase, instance: int, uids: dict[str, str]) -> Dataset:
    g = case.geometry
    siemens = case.manufacturer == "SIEMENS"
    sop_uid = _uid(case, "sop", instance)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = _STUDY_DATE
    ds.StudyTime = ds.SeriesTime = "000000"
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = case.manufacturer
    ds.ManufacturerModelName = "Sensation 64" if siemens else "Brilliance 64"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Pancreas"
    ds.SeriesDescription = "Pancreas"
    ds.PatientName = case.case_id
    ds.PatientID = case.case_id
    ds.PatientBirthDate = ""
    ds.PatientSex = case.patient_sex
    ds.PatientIdentityRemoved = "YES"
    ds.BodyPartExamined = "ABDOMEN"
    ds.ContrastBolusAgent = "IV contrast, portal-venous phase (synthetic)"
    ds.SliceThickness = _ds(g.slice_thickness)
    ds.SpacingBetweenSlices = _ds(g.slice_interval)
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    pos = g.position(instance)
    ds.ImagePositionPatient = [_ds(v) for v in pos]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(pos[2])
    ds.ImageComments = "Synthetic phantom (pancreas-gvae); not patient data"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = g.size
    ds.PixelSpacing = [_ds(g.pixel_spacing)] * 2
    ds.BitsAllocated = 16
    ds.BitsStored = 12 if siemens else 16
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0 if siemens else 1
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = str(RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    stored = case.hu[instance - 1].astype(np.int32) - RESCALE_INTERCEPT
    ds.PixelData = stored.astype("<u2" if siemens else "<i2").tobytes()
    return ds


def write_phantom_case(case: PhantomCase, out_dir: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write one case's DICOM series and label under the cohort folder; returns (series folder, label file)."""
    out_dir = Path(out_dir)
    case_dir = out_dir / COLLECTION_DIR / case.case_id
    if case_dir.exists():
        if not overwrite:
            raise PipelineError(f"{case_dir} already exists; pass overwrite (--overwrite) to replace it")
        shutil.rmtree(case_dir)
    uids = {role: _uid(case, role) for role in ("study", "series", "frame")}
    short = case.case_id.replace("_", "")
    study_dir = case_dir / f"01-01-2000-{short}-Pancreas-{uids['study'][-5:]}"
    series_dir = study_dir / f"Pancreas-{uids['series'][-5:]}"
    series_dir.mkdir(parents=True)
    for instance in range(1, case.geometry.slices + 1):
        ds = _slice_dataset(case, instance, uids)
        ds.save_as(series_dir / f"1-{instance:03d}.dcm", enforce_file_format=True)

    lbl = label_path(out_dir, case.index)
    lbl.parent.mkdir(parents=True, exist_ok=True)
    affine = case.geometry.label_affine()
    img = nib.Nifti1Image(mask_to_label_array(case.mask), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    # gzip with mtime 0 so that the same seed gives byte-identical label files.
    lbl.write_bytes(gzip.compress(img.to_bytes(), compresslevel=6, mtime=0))
    return series_dir, lbl


def make_phantom_cohort(out_dir: str | Path, *, cases: int = 4, size: int = 64, slices: int | None = None,
                        seed: int = 0, start_index: int = 1, slice_interval: float | None = None,
                        overwrite: bool = False) -> list[Path]:
    """Write cases ``start_index .. start_index + cases - 1``; returns their DICOM series folders.

    Labels go to :func:`label_path`. See the module docstring for geometry, layout and conventions.
    """
    if cases < 1:
        raise PipelineError(f"need at least one phantom case, got {cases}")
    if start_index < 1 or start_index + cases - 1 > 9999:
        raise PipelineError(f"case numbers must stay within 1..9999, got {start_index}..{start_index + cases - 1}")
    _check(size=size, slices=slices, slice_interval=slice_interval)
    series_dirs = []
    for index in range(start_index, start_index + cases):
        case = render_phantom_case(index, size=size, slices=slices, seed=seed, slice_interval=slice_interval)
        series_dirs.append(write_phantom_case(case, out_dir, overwrite=overwrite)[0])
    return series_dirs
