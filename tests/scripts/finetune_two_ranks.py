"""Run by ``torchrun --nproc_per_node N`` in tests/test_finetune.py: fine-tuning on several CPU processes.

Usage: finetune_two_ranks.py PROJECT_JSON OUTPUT_DIR. Runs the small cases of ``CASES`` one after the
other in one launch (process start-up is the cost): end-to-end classification in ``partial`` and
``full`` mode reading ``mid`` and a ``downN`` block, decoder segmentation and the DynUNet reference
with the last rank's training batches stripped of their segmentations. For every case each rank
writes OUTPUT_DIR/<case>/rank-<i>.json: the optimizer steps it took, how many of its batches had no
loss, and a checksum of the weights it ended with, so the test can compare ranks and step counts.
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
}
NO_SEGMENTATION_ON_LAST_RANK = ("segment-full", "dynunet")


def main(project_json: str, output_dir: str) -> None:
    import torch
    from accelerate import PartialState

    from orthodiff.finetune import endtoend

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

    endtoend.fit_best = recording_fit_best
    endtoend.distributed_loss = counting_distributed_loss
    for case, overrides in CASES.items():
        record.clear()
        cfg = tiny_config(project, out / case, *STEPS, *overrides)
        last_rank = state.process_index == state.num_processes - 1 and state.num_processes > 1
        with stripped_segmentations(last_rank and case in NO_SEGMENTATION_ON_LAST_RANK):
            if case == "dynunet":
                from orthodiff.bench import baselines_train

                baselines_train.fit_best = recording_fit_best
                baselines_train.train_segmentation_baseline(cfg, "dynunet", out / case / "run", {"base_filters": 4})
            else:
                from orthodiff.finetune.run import run_finetune

                run_finetune(cfg)
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
