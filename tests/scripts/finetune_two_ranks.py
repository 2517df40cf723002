"""Run by ``torchrun --nproc_per_node N`` in tests/test_finetune.py: fine-tuning on several CPU processes.

Usage: finetune_two_ranks.py PROJECT_JSON OUTPUT_DIR. Runs the small cases of ``CASES`` one after the
other in one launch (process start-up is the cost): end-to-end classification in ``partial`` and
``full`` mode reading ``mid`` and a ``downN`` block, decoder segmentation and the DynUNet reference
with the last rank's training batches stripped of their segmentations, the ResNet classification
baseline, and a probe grid on cached features. For every case each rank writes
OUTPUT_DIR/<case>/rank-<i>.json: the optimizer steps it took, how many of its batches had no loss, a
checksum of the weights it ended with, the probe cells it trained and the files it wrote into the
run directory, so the test can compare ranks, step counts and writers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_archive import tiny_config  # noqa: E402

STEPS = ["finetune.max_steps=3", "finetune.eval_every=2", "finetune.batch_size=2"]
CASES = {
    "partial-mid": ["finetune.mode=partial", "features.blocks=[mid]"],
    "full-mid": ["finetune.mode=full", "features.blocks=[mid]"],
    "partial-down0": ["finetune.mode=partial", "features.blocks=[down0]"],
    "full-down1": ["finetune.mode=full", "features.blocks=[down1]"],
    "segment-full": ["finetune.task=segment", "finetune.mode=full", "finetune.decoder_width=8"],
    "dynunet": ["finetune.task=segment"],
    "resnet3d": [],
    "grid": ["finetune.mode=grid", "features.blocks=[mid,down1]", "finetune.grid_learning_rates=[3e-3,1e-4]"],
}
NO_SEGMENTATION_ON_LAST_RANK = ("segment-full", "dynunet")


def main(project_json: str, output_dir: str) -> None:
    import torch
    from accelerate import PartialState

    from orthodiff import baselines, fileio
    from orthodiff.finetune import endtoend, probe, scoring, steps

    state = PartialState(cpu=True)
    torch.set_num_threads(1)
    project = {key: Path(value) if isinstance(value, str) else value
               for key, value in json.loads(Path(project_json).read_text()).items()}
    out = Path(output_dir)
    record: dict = {}
    original_fit_best = endtoend.fit_best

    def recording_fit_best(*args, **kwargs):
        model, summary = original_fit_best(*args, **kwargs)
        record.update(steps=summary["steps"], checksum=float(sum(p.detach().double().sum() for p in model.parameters())))
        return model, summary

    original_distributed_loss = endtoend.distributed_loss

    def counting_distributed_loss(accelerator, model, loss):
        record["steps_without_loss"] = record.get("steps_without_loss", 0) + int(loss is None)
        return original_distributed_loss(accelerator, model, loss)

    original_train_best = steps.train_best

    def recording_train_best(*args, **kwargs):
        summary = original_train_best(*args, **kwargs)
        record["steps"] = summary["steps"]
        return summary

    original_build_baseline = baselines.build_baseline

    def keeping_build_baseline(*args, **kwargs):
        record["model"] = original_build_baseline(*args, **kwargs)  # trained in place
        return record["model"]

    original_fit = probe._Trainer.fit

    def counting_fit(trainer, cells):
        record["probe_cells"] = record.get("probe_cells", 0) + len(cells)
        return original_fit(trainer, cells)

    original_atomic_path, original_log_init = fileio.atomic_path, scoring.MetricsLog.__init__

    def noting_atomic_path(path):
        note_written(path)
        return original_atomic_path(path)

    def noting_log_init(log, path):
        note_written(path)
        original_log_init(log, path)

    def note_written(path):
        if Path(path).resolve().is_relative_to(record["run_dir"]):
            record["written"].append(str(Path(path).resolve().relative_to(record["run_dir"])))

    endtoend.fit_best = recording_fit_best
    endtoend.distributed_loss = counting_distributed_loss
    steps.train_best = recording_train_best
    baselines.build_baseline = keeping_build_baseline
    probe._Trainer.fit = counting_fit
    fileio.atomic_path = noting_atomic_path
    scoring.MetricsLog.__init__ = noting_log_init
    for case, overrides in CASES.items():
        record.clear()
        record.update(run_dir=(out / case / "run").resolve(), written=[])
        cfg = tiny_config(project, out / case, *STEPS, *overrides)
        last_rank = state.process_index == state.num_processes - 1 and state.num_processes > 1
        with stripped_segmentations(last_rank and case in NO_SEGMENTATION_ON_LAST_RANK):
            if case == "dynunet":
                from orthodiff.bench.cells import baselines_train

                baselines_train.train_segmentation_baseline(cfg, "dynunet", out / case / "run", {"base_filters": 4})
            elif case == "resnet3d":
                from orthodiff.bench.cells import baselines_train

                baselines_train.train_baseline(cfg, "resnet3d", out / case / "run", {"widen_factor": 0.125},
                                               epochs=1, learning_rate=1e-3, batch_size=4)
                model = record.pop("model")
                record["checksum"] = float(sum(p.detach().double().sum() for p in model.parameters()))
            else:
                from orthodiff.finetune.run import run_finetune

                run_finetune(cfg)
        record.pop("run_dir")
        (out / case / f"rank-{state.process_index}.json").write_text(json.dumps(record))
        state.wait_for_everyone()


class stripped_segmentations:
    """While active, the training studies come without segmentations: this rank has nothing to learn."""

    def __init__(self, active: bool):
        self.active = active

    def __enter__(self):
        import torch

        from orthodiff.data.datasets import StudyDataset
        from orthodiff.finetune import run

        self.saved = (run._study_datasets, StudyDataset.__getitem__)
        if not self.active:
            return self
        make_datasets, get_item = self.saved

        def marked_datasets(*args, **kwargs):
            datasets = make_datasets(*args, **kwargs)
            datasets["train"].strip_segmentations = True
            return datasets

        def item_without_segmentation(dataset, index):
            item = get_item(dataset, index)
            if getattr(dataset, "strip_segmentations", False) and "seg_present" in item:
                item["seg_present"] = torch.zeros_like(item["seg_present"])
            return item

        run._study_datasets = marked_datasets
        StudyDataset.__getitem__ = item_without_segmentation
        return self

    def __exit__(self, *exc):
        from orthodiff.data.datasets import StudyDataset
        from orthodiff.finetune import run

        run._study_datasets, StudyDataset.__getitem__ = self.saved
        return False


if __name__ == "__main__":
    main(*sys.argv[1:3])
