"""A diagnosis head with a readout that keeps local evidence and features chosen per plane,
exported as a pipeline: it predicts what its run predicted, and Grad-CAM still explains it."""

import json

import numpy as np
import pandas as pd
import pytest
from pipeline_fixtures import _overrides, tiny_pipeline

from orthodiff.io.volume import read_volume
from orthodiff.planes import PLANES


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory)


@pytest.mark.parametrize("pooling", ["grid_max", "attention_max"])
def test_exported_head_with_new_pooling_predicts_as_its_run(built, tmp_path, pooling):
    from orthodiff.config import load_config
    from orthodiff.finetune.run import run_finetune
    from orthodiff.pipeline.pipeline import OrthoDiffusionPipeline

    run = tmp_path / "classify"
    run_finetune(load_config(["tiny"], _overrides(built["root"]) + [
        f"finetune.output_dir={run}", f"features.output_dir={tmp_path / 'features'}", "finetune.task=classify",
        "finetune.mode=grid", "finetune.grid_learning_rates=[3e-3]", "finetune.epochs=4",
        f"finetune.pooling={pooling}", "finetune.readout_grid=[1,2,2]", "finetune.concat_features=2",
        "features.blocks=[mid,up0]", "features.timesteps=[25,100]"]))
    chosen = json.loads((run / "run.json").read_text())["grid"]["chosen"]
    assert all(len(keys) == 2 for keys in chosen.values())  # two (block, t) concatenated per plane

    OrthoDiffusionPipeline.from_runs(run).save_pretrained(tmp_path / "pipeline")
    pipeline = OrthoDiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    spec = pipeline.config["classifier"]
    assert spec["pooling"] == pooling and spec["readout_grid"] == [1, 2, 2] and spec["selection"] == chosen
    json.dumps(spec)  # the head spec stays plain JSON

    trained = pd.read_csv(run / "predictions.csv", dtype={"study_id": str, "patient_id": str}).set_index("study_id")
    for study_id in trained.index[:4]:
        folder = built["archive"] / trained.loc[study_id, "patient_id"] / study_id
        volumes = {p: read_volume(folder / f"{p}.nii.gz") for p in PLANES if (folder / f"{p}.nii.gz").exists()}
        result = pipeline.predict_study(volumes, study_id, explain=True, segment=False)
        # the feature store holds float16; the pipeline computes in float32
        for label in pipeline.labels:
            assert result.probabilities[label] == pytest.approx(trained.loc[study_id, f"prob_{label}"], abs=0.01)
        for plane in result.planes_used:
            heat = result.series[plane].heatmaps_tensor
            assert set(heat) == set(pipeline.labels)
            for value in heat.values():
                assert value.shape == tuple(pipeline.plane_size[plane]) and np.isfinite(value).all()
                assert value.min() >= 0 and value.max() <= 1
        # Grad-CAM leaves the head as it found it (eval mode), so the next study predicts as trained.
        assert not pipeline.classifier.training
