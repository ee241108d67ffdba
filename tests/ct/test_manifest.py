import pandas as pd

from pancreas_gvae.data.ct.manifest import COLUMNS, format_summary, read_manifest, to_frame, write_manifest


def test_summary_of_a_manifest_read_back_with_excluded_rows(tmp_path):
    rows = [{"case_id": "A", "status": "ok", "label_voxels": 226, "label_median_hu": 65.0, "from_cache": False},
            {"case_id": "B", "status": "excluded", "reason": "empty_label: the label has no pancreas voxel"}]
    write_manifest(to_frame(rows), tmp_path)
    back = read_manifest(tmp_path)
    assert list(back.columns) == COLUMNS
    text = format_summary(back)
    assert "2 case(s): 1 ok, 1 excluded (0 reused from the cache)" in text
    assert "226" in text and "B: empty_label" in text


def test_summary_counts_cache_reuse():
    df = pd.DataFrame([{c: "" for c in COLUMNS} | {"case_id": "A", "status": "ok", "from_cache": "True"}])
    assert "(1 reused from the cache)" in format_summary(df)
