"""``data.series``: which series a run uses, and one-plane runs from prepare through pretrain."""

import math

import pandas as pd
import pytest

from orthodiff.config import SeriesSelection, load_config
from orthodiff.data.selection import filter_series, select_series
from orthodiff.errors import OrthodiffError


def _manifest() -> pd.DataFrame:
    """Two studies; s1 holds three sagittal candidates (PD fs, PD, T1) and one coronal, s2 one
    sagittal series of unknown sequence (an older manifest's row)."""
    rows = [
        ("s1", "s1/sagittal/a", "sagittal", 20, "pd", 1.0, "PD FS SAG"),
        ("s1", "s1/sagittal/b", "sagittal", 30, "pd", 0.0, "PD SAG"),
        ("s1", "s1/sagittal/c", "sagittal", 40, "t1", 0.0, "T1 SAG"),
        ("s1", "s1/coronal", "coronal", 24, "pd", 1.0, "PD FS COR"),
        ("s2", "s2/sagittal", "sagittal", 18, math.nan, math.nan, math.nan),
    ]
    frame = pd.DataFrame(rows, columns=["study_id", "series_id", "plane", "n_slices", "contrast", "fat_suppressed",
                                        "series_description"])
    frame["patient_id"] = frame["study_id"]
    return frame


def _ids(frame) -> list:
    return sorted(frame["series_id"])


def test_the_default_selection_keeps_one_series_per_plane_preferring_fat_suppressed():
    chosen = select_series(_manifest(), SeriesSelection())
    # fat_suppressed beats most_slices; a study with one series keeps it although its sequence is unknown
    assert _ids(chosen) == ["s1/coronal", "s1/sagittal/a", "s2/sagittal"]
    assert _ids(select_series(_manifest(), SeriesSelection(), one_per_plane=False)) == _ids(_manifest())


def test_prefer_rules_apply_in_order_with_a_fixed_tie_break():
    most = select_series(_manifest(), SeriesSelection(prefer=["most_slices"]))
    assert "s1/sagittal/c" in set(most["series_id"])
    pd_first = select_series(_manifest(), SeriesSelection(prefer=["pd", "most_slices"]))
    assert "s1/sagittal/b" in set(pd_first["series_id"])
    # no rule separates them: the lowest series_id wins, whatever the row order
    shuffled = _manifest().sample(frac=1.0, random_state=3)
    assert _ids(select_series(shuffled, SeriesSelection(prefer=[]))) == ["s1/coronal", "s1/sagittal/a", "s2/sagittal"]


def test_filters_treat_unknown_values_as_not_matching():
    frame = _manifest()
    assert _ids(filter_series(frame, SeriesSelection(planes=["coronal"]))) == ["s1/coronal"]
    assert _ids(filter_series(frame, SeriesSelection(contrasts=["t1"]))) == ["s1/sagittal/c"]
    assert _ids(filter_series(frame, SeriesSelection(fat_suppressed=False))) == ["s1/sagittal/b", "s1/sagittal/c"]
    assert _ids(filter_series(frame, SeriesSelection(description_regex=r"pd\s+fs"))) == ["s1/coronal", "s1/sagittal/a"]
    # an old manifest without the sequence columns: nothing matches a contrast, plane filters still work
    old = frame[["study_id", "series_id", "plane", "patient_id"]]
    assert len(filter_series(old, SeriesSelection(contrasts=["pd"]))) == 0
    assert _ids(filter_series(old, SeriesSelection(planes=["sagittal"]))) == ["s1/sagittal/a", "s1/sagittal/b",
                                                                              "s1/sagittal/c", "s2/sagittal"]


@pytest.mark.parametrize(
    "selection, field",
    [
        (SeriesSelection(description_regex="PD (FS"), "data.series.description_regex"),
        (SeriesSelection(contrasts=["dess2"]), "data.series.contrasts"),
        (SeriesSelection(planes=["oblique"]), "data.series.planes"),
        (SeriesSelection(prefer=["newest"]), "data.series.prefer"),
    ],
)
def test_bad_fields_are_one_line_naming_the_field(selection, field):
    with pytest.raises(OrthodiffError) as info:
        select_series(_manifest(), selection)
    assert str(info.value).startswith(field) and "\n" not in str(info.value)


def test_a_config_override_reaches_the_selection():
    cfg = load_config(["tiny"], ["data.series.planes=[sagittal]", "data.series.contrasts=[pd]",
                                 "data.series.fat_suppressed=true"])
    assert _ids(select_series(_manifest(), cfg.data.series)) == ["s1/sagittal/a"]


def test_a_sagittal_only_cache_pretrains_its_plane_without_sizes_for_the_others(tmp_path):
    """prepare --plane sagittal, then pretrain plane=all: trains the plane the cache holds, even
    when the config's sizes for the two planes the cache never saw differ from prepare's."""
    from tiny_archive import write_tiny_archive

    from orthodiff.cli import main
    from orthodiff.data.cache import PlaneCache
    from orthodiff.data.scan import scan_archive
    from orthodiff.training.pretrain import run_pretraining

    archive = write_tiny_archive(tmp_path / "archive", studies=4)
    scan_archive(archive, tmp_path / "manifest.parquet")
    main(["prepare", str(tmp_path / "manifest.parquet"), "--out", str(tmp_path / "cache"), "--workers", "1",
          "--plane", "sagittal", "--config", "tiny", "data.plane_size.sagittal=[8,16,16]"])
    cache = PlaneCache(tmp_path / "cache")
    assert set(cache.index["plane"]) == {"sagittal"} and len(cache) == 4
    cfg = load_config(["tiny"], [
        f"data.cache={tmp_path / 'cache'}", f"data.splits={tmp_path / 'none.json'}",
        "data.plane_size.sagittal=[8,16,16]", "data.plane_size.coronal=[8,64,64]", "data.plane_size.axial=[4,16,16]",
        f"pretrain.output_dir={tmp_path / 'pretrain'}", "pretrain.plane=all", "pretrain.max_steps=1",
        "pretrain.warmup_steps=0", "pretrain.preview_every=0", "pretrain.checkpoint_every=10",
    ])
    outputs = run_pretraining(cfg)
    assert list(outputs) == ["sagittal"]
    assert (tmp_path / "pretrain" / "denoisers" / "sagittal" / "model.safetensors").exists()
    assert not (tmp_path / "pretrain" / "denoisers" / "coronal").exists()


def test_prepare_keeps_only_selected_series_and_an_empty_selection_is_one_line(tmp_path):
    from tiny_archive import write_tiny_archive

    from orthodiff.data.prepare import prepare_cache
    from orthodiff.data.scan import scan_archive

    archive = write_tiny_archive(tmp_path / "archive", studies=2)
    scan_archive(archive, tmp_path / "manifest.parquet")
    sizes = {p: [8, 16, 16] for p in ("sagittal", "coronal", "axial")}
    result = prepare_cache(tmp_path / "manifest.parquet", tmp_path / "cache", sizes, workers=1,
                           selection=SeriesSelection(planes=["coronal", "axial"]))
    index = pd.read_parquet(tmp_path / "cache" / "index.parquet")
    assert result.total == len(index) and set(index["plane"]) == {"coronal", "axial"}
    # a manifest written before the sequence columns existed
    old = pd.read_parquet(tmp_path / "manifest.parquet").drop(columns=["contrast", "fat_suppressed"], errors="ignore")
    old.to_parquet(tmp_path / "old.parquet", index=False)
    with pytest.raises(OrthodiffError, match=r"^data.series: no series of .* contrast column") as info:
        prepare_cache(tmp_path / "old.parquet", tmp_path / "cache2", sizes, workers=1,
                      selection=SeriesSelection(contrasts=["pd"]))
    assert "\n" not in str(info.value)


def test_predict_inputs_follow_the_recorded_selection(tmp_path):
    """A manifest given to predict with two sagittal candidates: the preferred one is used, the
    other listed as ignored; a study the selection empties becomes an error row."""
    import numpy as np
    from tiny_archive import write_tiny_archive

    from orthodiff.pipeline.inputs import collect_studies

    archive = write_tiny_archive(tmp_path / "archive", studies=1)
    image = next(archive.rglob("sagittal.nii.gz"))
    rows = [{"patient_id": "P1", "study_id": "s1", "series_id": f"s1/sagittal/{name}", "plane": "sagittal",
             "path": str(image), "format": "nifti", "n_slices": slices, "fat_suppressed": fat}
            for name, slices, fat in (("a", 30, 0.0), ("b", 20, 1.0), ("c", 40, np.nan))]
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    studies, errors = collect_studies([tmp_path / "manifest.csv"], selection={"prefer": ["fat_suppressed", "most_slices"]})
    assert not errors and studies[0].chosen("sagittal")["series_id"] == "s1/sagittal/b"
    assert studies[0].ignored() == ["s1/sagittal/a", "s1/sagittal/c"]  # unknown ranks last
    studies, errors = collect_studies([tmp_path / "manifest.csv"], selection={"planes": ["coronal"]})
    assert studies == [] and errors[0]["study_id"] == "s1" and "series selection" in errors[0]["reason"]


def test_a_selected_cache_holds_only_its_series_and_the_feature_record_notes_it(tmp_path):
    from pretrain_fixtures import write_fixture_cache

    from orthodiff.data.cache import PlaneCache
    from orthodiff.data.selection import select_cache, selection_spec

    root = write_fixture_cache(tmp_path / "cache", patients=3)
    cache = select_cache(PlaneCache(root), SeriesSelection(planes=["axial"]))
    assert set(cache.index["plane"]) == {"axial"} and len(cache) == 3
    assert cache.image("knee-0001/axial").shape[0] == 1
    with pytest.raises(OrthodiffError, match="not in the cache index"):
        cache.image("knee-0001/sagittal")
    with pytest.raises(OrthodiffError, match="^data.series: no series of the cache"):
        select_cache(PlaneCache(root), SeriesSelection(contrasts=["pd"]))
    assert selection_spec(SeriesSelection()) == {}
    assert selection_spec(SeriesSelection(planes=["axial"]))["series"]["filters"] == "planes axial"


def test_sharded_prepare_of_one_plane_merges(tmp_path):
    """Shards prepared with --plane hold only that plane; the merge, given the same selection,
    accepts them as complete."""
    from tiny_archive import write_tiny_archive

    from orthodiff.cli import main
    from orthodiff.data.scan import scan_archive

    archive = write_tiny_archive(tmp_path / "archive", studies=3)
    scan_archive(archive, tmp_path / "manifest.parquet")
    common = ["--plane", "axial", "--config", "tiny", "data.plane_size.axial=[8,16,16]"]
    for shard in ("1/2", "2/2"):
        main(["prepare", str(tmp_path / "manifest.parquet"), "--out", str(tmp_path / "cache"), "--workers", "1",
              "--shard", shard, *common])
    main(["prepare", str(tmp_path / "manifest.parquet"), "--out", str(tmp_path / "cache"), "--merge", *common])
    index = pd.read_parquet(tmp_path / "cache" / "index.parquet")
    manifest = pd.read_parquet(tmp_path / "manifest.parquet")
    assert sorted(index["series_id"]) == sorted(manifest.loc[manifest["plane"] == "axial", "series_id"])
