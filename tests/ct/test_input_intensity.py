"""Pre-windowed (display-value) cohorts (issue 13, item 6): ``preprocess.input_intensity`` maps them before the
checks, the manifest and the cache key record it, and the HU checks stay meaningful (or are skipped, noted)."""

from __future__ import annotations

import numpy as np
import pytest

from pancreas_gvae.data.ct.config import DataConfig, InputIntensityConfig, config_hash, load_data_config
from pancreas_gvae.data.ct.prepare import prepare_dataset
from pancreas_gvae.errors import PipelineError
from pancreas_gvae.transforms.cache import load_cached_case

WINDOW = [-125.0, 275.0]


def to_display(hu: np.ndarray) -> np.ndarray:
    """HU clipped to [-125, 275] and scaled to 0..255, as public 8-bit abdominal CT sets are published."""
    return np.rint((np.clip(hu, *WINDOW) - WINDOW[0]) * 255.0 / (WINDOW[1] - WINDOW[0])).astype(np.uint8)


@pytest.fixture
def windowed_root(tmp_path, synth):
    """``ok8`` (8-bit display values, label on the pancreas) and ``air8`` (same, label in the air corner)."""
    root = tmp_path / "windowed"
    case = synth.write_case(tmp_path / "src", "src")
    affine = synth.ras_affine(case.pixel, 2.5, case.origin, float(case.z[0]))
    image = synth.nifti_label_array(to_display(case.hu.astype(np.float32)))
    wrong = np.zeros_like(case.mask)
    wrong[3:9, 1:5, 1:5] = 1
    for name, mask in (("ok8", case.mask), ("air8", wrong)):
        synth.write_nifti(root / f"{name}.nii.gz", image, affine)
        synth.write_nifti(root / f"{name}_label.nii.gz", synth.nifti_label_array(mask), affine)
    return root


def config(kind: str, window) -> DataConfig:
    cfg = DataConfig()
    cfg.preprocess.input_intensity = InputIntensityConfig(kind=kind, window=window)
    return cfg


def run(root, out, cfg=None):
    return prepare_dataset(root, out, layout="folder", config=cfg, progress=False).set_index("case_id")


def test_display_values_are_implausible_hu_as_stored(windowed_root, tmp_path):
    df = run(windowed_root, tmp_path / "out")
    assert df.loc["ok8", "reason"].startswith("implausible_hu:")
    assert df.loc["ok8", "input_intensity"] == "hu"


def test_known_window_prepares_with_meaningful_hu_checks(windowed_root, tmp_path):
    out = tmp_path / "out"
    df = run(windowed_root, out, config("display", WINDOW))
    row = df.loc["ok8"]
    assert row["status"] == "ok", row["reason"]
    assert row["input_intensity"] == "display [-125, 275] HU as 0..255"
    assert row["hu_min"] == pytest.approx(-125.0) and row["hu_max"] <= 275.0
    assert 90 <= row["label_median_hu"] <= 110  # back in HU: the pancreas blob is 100 HU
    assert np.isnan(row["label_air_fraction"]) and row["label_fat_fraction"] == 0.0
    assert "label_air_fraction_skipped: the window floor -125 HU" in row["notes"]
    # the pairing check still works: a mask on air (clipped to the floor, < -50 HU) is refused
    assert df.loc["air8", "reason"].startswith("label_hu_check:") and "fat or air" in df.loc["air8", "reason"]
    cached = load_cached_case(out / "cache" / "ok8")
    assert 0.0 <= float(cached.image.min()) and float(cached.image.max()) <= 1.0
    assert cached.image.shape[1] < 125  # the body crop found the body above the window floor (128 mm uncropped)


def test_unknown_window_skips_the_true_hu_checks_and_notes_it(windowed_root, tmp_path):
    out = tmp_path / "out"
    df = run(windowed_root, out, config("display", None))
    for case_id in ("ok8", "air8"):  # without true HU a mask on air cannot be told from one on pancreas
        row = df.loc[case_id]
        assert row["status"] == "ok", row["reason"]
        assert row["input_intensity"] == "display (unknown window) 0..255"
        assert "hu_checks_skipped:" in row["notes"]
        assert np.isnan(row["label_median_hu"]) and row["label_voxels"] > 0
    cached = load_cached_case(out / "cache" / "ok8")
    assert float(cached.image.max()) > 0.5  # scaled from the display range 0..255, not from the HU window


def test_values_outside_the_declared_display_range(cohort_root, tmp_path):
    df = run(cohort_root, tmp_path / "out", config("display", WINDOW))  # an HU DICOM cohort declared as display
    assert df.loc["good", "reason"].startswith("implausible_hu:")
    assert "outside the declared display range 0..255" in df.loc["good", "reason"]


def test_the_mapping_is_part_of_the_cache_key(windowed_root, tmp_path):
    hashes = {config_hash(config(k, w), [1]) for k, w in [("hu", None), ("display", WINDOW), ("display", None),
                                                         ("display", [-160.0, 240.0])]}
    assert len(hashes) == 4
    out = tmp_path / "out"
    first = run(windowed_root, out, config("display", WINDOW))
    other = run(windowed_root, out, config("display", None))
    assert not other.loc["ok8", "from_cache"] and other.loc["ok8", "config_hash"] != first.loc["ok8", "config_hash"]


def test_yaml_key_and_validation(tmp_path):
    path = tmp_path / "windowed.yaml"
    path.write_text("preprocess:\n  input_intensity:\n    kind: display\n    window: [-125, 275]\n")
    cfg = load_data_config(path)
    assert cfg.preprocess.input_intensity == InputIntensityConfig(kind="display", window=[-125, 275])
    for text, match in [("kind: png", "kind"), ("kind: hu\n    window: [-125, 275]", "window"),
                        ("kind: display\n    window: [275, -125]", "window"), ("colour: red", "colour")]:
        path.write_text(f"preprocess:\n  input_intensity:\n    {text}\n")
        with pytest.raises(PipelineError, match=match):
            load_data_config(path)
