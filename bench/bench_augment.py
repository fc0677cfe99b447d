#!/usr/bin/env python
"""Augmentation throughput: batched pipeline vs one-sentence-at-a-time, same algorithm, same run.

On the embedded default (rt_polarity train sentences, packaged MiniLM + fitted head, packaged GloVe 50-d),
for three candidate sources — ``glove`` (GloVe for every eligible word), ``mlm`` (masked LM only) and
``mlm_glove`` (the published rule, the default) — it times

- ``reference``: :class:`augment.reference.ReferenceAugmenter`, one sentence and one word at a time
  (full-sequence logits and a full vocabulary sort per masked word, a full dot + sort per GloVe word);
- ``batched``: :class:`augment.augmenter.Augmenter` in this process (all torch threads);
- ``job``: the real job (``augment.job.run_shard``) with ``--workers`` processes, chunk files and merge,

asserts that all three give the same sentences for the same seed, and prints sentences/s and ratios.
The GloVe neighbour cache is per process, so every timing starts cold. Without ``--mlm_head`` a quick head
is fitted first (its quality does not change the timings).

    python bench/bench_augment.py --sample 200 --workers 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample", type=int, default=200, help="first N train sentences")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--mlm_head", default=None, help="a head from run/fit_mlm_head.py (default: fit a quick one)")
    ap.add_argument("--sources", default="glove,mlm,mlm_glove")
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--num_new", type=int, default=20)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--reference_sample", type=int, default=None, help="time the reference on the first K only")
    args = ap.parse_args()

    import torch

    from augment.augmenter import Augmenter
    from augment.build import augment_params
    from augment.config import AugmentConfig, JobConfig, MLMConfig
    from augment.glove import GloveNeighbours, load_glove
    from augment.job import default_input, run_shard
    from augment.mlm import load_masked_lm
    from augment.reference import ReferenceAugmenter
    from augment.stopwords import load_stopwords
    from augment.words import WordSplitter
    from ds_kdqat.data.glue_format import read_task_file, write_task_file
    from ds_kdqat.data.tasks import get_task

    work = Path(tempfile.mkdtemp(prefix="bench_augment_"))
    spec = get_task("rt_polarity")
    train = default_input(AugmentConfig(), spec)
    examples, report = read_task_file(train, spec)
    examples = examples[: args.sample]
    sample_file = work / "sample.tsv"
    write_task_file(sample_file, spec, examples, header=report.header)
    texts = [e.text_a for e in examples]
    lines = [e.line for e in examples]
    print(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, load {os.getloadavg()}")
    print(f"sample: {len(texts)} sentences of {train}")

    head = args.mlm_head
    if head is None:
        from transformers import AutoModel, AutoTokenizer

        from augment.fit_head import FitHeadOptions, fit_mlm_head
        from augment.mlm import packaged_minilm_path
        from augment.mlm_head import save_head

        t0 = time.perf_counter()
        all_examples, _ = read_task_file(train, spec)
        path = packaged_minilm_path()
        h, _ = fit_mlm_head(
            AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path),
            [e.text_a for e in all_examples[:1000]], FitHeadOptions(rounds=1, epochs=1, max_steps=20), log=lambda s: None,
        )
        head, _ = save_head(h, str(work / "head.safetensors"), {"encoder": path, "note": "bench quick fit"})
        print(f"fitted a quick head in {time.perf_counter() - t0:.0f} s")

    lm = load_masked_lm(None, head, "cpu")
    glove = load_glove(vocab_size=100_000)
    splitter = WordSplitter(lm.tokenizer)
    stopwords = load_stopwords()
    rows = []
    for source in args.sources.split(","):
        cfg = AugmentConfig(
            input=str(sample_file), output=str(work / f"out_{source}.tsv"), num_new=args.num_new, seed=args.seed,
            candidate_source=source, mlm=MLMConfig(head=head, batch_size=args.batch_size, device="cpu"),
            job=JobConfig(num_workers=args.workers, chunk_size=max(1, len(texts) // (4 * args.workers)), progress=False),
        )
        params = augment_params(cfg)
        n_ref = args.reference_sample or len(texts)
        ref = ReferenceAugmenter(splitter, stopwords, params, glove, lm)
        t0 = time.perf_counter()
        want = [ref.augment_one([t], args.seed, i) for t, i in zip(texts[:n_ref], lines[:n_ref])]
        t_ref = (time.perf_counter() - t0) * len(texts) / n_ref

        batched = Augmenter(splitter, stopwords, params, GloveNeighbours(glove, params.num_candidates), lm)
        t0 = time.perf_counter()
        got = batched.augment([[t] for t in texts], lines, args.seed)
        t_batch = time.perf_counter() - t0
        assert got[:n_ref] == want, f"{source}: batched output differs from the reference"

        t0 = time.perf_counter()
        run_shard(cfg)
        t_job = time.perf_counter() - t0
        out_rows, _ = read_task_file(cfg.output, spec)
        expected_rows = [t for t, new in zip(texts, got) for t in [t, *new[0]]]
        assert [e.text_a for e in out_rows] == expected_rows, f"{source}: job output differs"
        n = len(texts)
        rows.append((source, n / t_ref, n / t_batch, n / t_job, t_ref / t_batch, t_ref / t_job))
        print(f"{source}: reference {n / t_ref:.2f}/s, batched {n / t_batch:.2f}/s, job {n / t_job:.2f}/s", flush=True)

    print("\n| candidates | reference (sent/s) | batched, 1 process (sent/s) | job, %d workers (sent/s) | batched / ref | job / ref |" % args.workers)
    print("|---|---|---|---|---|---|")
    for source, r, b, j, rb, rj in rows:
        print(f"| {source} | {r:.2f} | {b:.2f} | {j:.2f} | {rb:.1f}x | {rj:.1f}x |")
    print("(job time includes starting the workers: imports, model and GloVe loading)")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
