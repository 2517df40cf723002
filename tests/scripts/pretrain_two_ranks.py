"""Run by ``torchrun --nproc_per_node 2`` in tests/test_pretrain.py: a real two-process CPU run.

Usage: pretrain_two_ranks.py CACHE OUTPUT_DIR. Trains the tiny sagittal denoiser through
``run_pretraining`` (gloo, Accelerate MULTI_CPU) and, after training, has every rank write its
raw parameters to OUTPUT_DIR/rank-<i>.safetensors so the test can compare the ranks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain_fixtures import tiny_config  # noqa: E402

from orthodiff.training import pretrain  # noqa: E402


def main(cache: str, output_dir: str) -> None:
    from accelerate import PartialState
    from safetensors.torch import save_file

    # Accelerator(cpu=True) in several torchrun processes: gloo, MULTI_CPU.
    state = PartialState(cpu=True)
    out = Path(output_dir)
    original_run = pretrain._Loop.run

    def run_then_dump(loop, *args, **kwargs):
        original_run(loop, *args, **kwargs)
        weights = loop.accelerator.unwrap_model(loop.model).state_dict()
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(out / f"rank-{state.process_index}.safetensors"))

    pretrain._Loop.run = run_then_dump
    cfg = tiny_config(Path(cache), out, "pretrain.max_steps=4", "pretrain.checkpoint_every=2")
    pretrain.run_pretraining(cfg)
    info = {"distributed_type": str(state.distributed_type), "num_processes": state.num_processes}
    (out / f"rank-{state.process_index}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main(*sys.argv[1:3])
