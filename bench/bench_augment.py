#!/usr/bin/env python
"""Augmentation throughput: batched pipeline and job vs one-sentence-at-a-time, same algorithm, same run.

On the embedded default (rt_polarity train sentences, packaged MiniLM + fitted head, packaged GloVe 50-d),
for the candidate sources ``glove`` (GloVe for every eligible word), ``mlm`` (masked LM only) and
``mlm_glove`` (the published rule, the default) it times

- ``reference``: :class:`augment.reference.ReferenceAugmenter`, one sentence and one word at a time
  (full-sequence logits and a full vocabulary sort per masked word, a full dot + sort per GloVe word), fp32,
  on the first ``--reference_sample`` sentences; its time is *scaled* to the whole sample (× N / K);
- ``batched``: :class:`augment.augmenter.Augmenter` in this process (all torch threads), on all N
  (``--no_batched`` skips it);
- ``job``: the real job (``augment.job.run_shard``) with ``--workers`` processes, default chunks and groups,
  chunk files and merge, worker start-up included, on all N.

In fp32 it asserts that reference, batched and job give the same sentences for the same seed (on the
reference subset; batched and job on all N). ``--mlm_precision fp32,int8_dynamic`` also runs the masked-LM
sources with the row-wise int8 encoder and reports, against fp32 on the reference subset, how many masked-LM
candidate lists are identical (ordered, and as sets: the draws use the set) and the mean overlap of the sets,
and the share of examples whose new sentences are identical. The GloVe neighbour cache is per process, so
every timing starts cold. Without ``--mlm_head`` a quick head is fitted first (its quality does not change the
timings). The 1-minute load average is printed at the start and end of every timing (other work on the
machine slows every figure; compare ratios taken in one run).

    python bench/bench_augment.py --sample 2000 --workers 2
    python bench/bench_augment.py --sample 300 --reference_sample 60 --sources mlm --mlm_precision fp32,int8_dynamic
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def load1() -> float:
    return os.getloadavg()[0]


@dataclass
class Row:
    source: str
    precision: str
    n: int
    t_ref: float
    t_batch: float | None
    t_job: float
    loads: list[float] = field(default_factory=list)
    agreement: dict | None = None


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample", type=int, default=200, help="first N train sentences (batched and job run on all)")
    ap.add_argument("--reference_sample", type=int, default=None,
                    help="time the reference on the first K and scale to N (default: min(N, 200))")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--mlm_head", default=None, help="a head from run/fit_mlm_head.py (default: fit a quick one)")
    ap.add_argument("--sources", default="glove,mlm,mlm_glove")
    ap.add_argument("--mlm_precision", default="fp32", help="comma list of fp32, int8_dynamic (masked-LM sources)")
    ap.add_argument("--no_batched", action="store_true", help="skip the in-process batched timing")
    ap.add_argument("--batch_size", type=int, default=None, help="masked copies per pass (default: the job's)")
    ap.add_argument("--chunk_size", type=int, default=None, help="job chunk size (default: the job's, 64)")
    ap.add_argument("--chunks_per_group", type=int, default=None, help="job groups (default: the job's auto)")
    ap.add_argument("--num_new", type=int, default=20)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    args.sources = args.sources.split(",")
    args.mlm_precision = args.mlm_precision.split(",")
    for p in args.mlm_precision:
        if p not in ("fp32", "int8_dynamic"):
            ap.error(f"--mlm_precision: {p!r} is not fp32 or int8_dynamic")
    return args


def fit_quick_head(train, spec, work: Path) -> str:
    from transformers import AutoModel, AutoTokenizer

    from augment.fit_head import FitHeadOptions, fit_mlm_head
    from augment.mlm import packaged_minilm_path
    from augment.mlm_head import save_head
    from ds_kdqat.data.glue_format import read_task_file

    t0 = time.perf_counter()
    all_examples, _ = read_task_file(train, spec)
    path = packaged_minilm_path()
    h, _ = fit_mlm_head(
        AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path),
        [e.text_a for e in all_examples[:1000]], FitHeadOptions(rounds=1, epochs=1, max_steps=20), log=lambda s: None,
    )
    head, _ = save_head(h, str(work / "head.safetensors"), {"encoder": path, "note": "bench quick fit"})
    print(f"fitted a quick head in {time.perf_counter() - t0:.0f} s")
    return head


def _rows(texts, new) -> list[str]:
    """The merged file's text column for one-field examples: each original, then its new sentences."""
    return [t for text, fields in zip(texts, new) for t in [text, *fields[0]]]


def candidate_agreement(fp32_aug, int8_aug, texts, lines, seed: int) -> dict:
    """Masked-LM candidate lists of int8 vs fp32 on ``texts``: identical lists (ordered), identical sets, mean
    |A ∩ B| / M, over every word the masked LM answers; and the share of examples whose draws are identical."""
    from augment.augmenter import word_route

    a_tables, b_tables = fp32_aug.candidate_tables(texts), int8_aug.candidate_tables(texts)
    same_examples = sum(fp32_aug.draw([a], seed, i) == int8_aug.draw([b], seed, i)
                        for a, b, i in zip(a_tables, b_tables, lines))
    same_list = same_set = 0
    overlap = 0.0
    n = 0
    for a, b in zip(a_tables, b_tables):
        for j, cands in a.candidates.items():
            if word_route(a.sentence, j, fp32_aug.stopwords, fp32_aug.params.candidate_source) != "mlm":
                continue
            other = b.candidates[j]
            n += 1
            same_list += cands == other
            same_set += set(cands) == set(other)
            overlap += len(set(cands) & set(other)) / max(len(cands), 1)
    return {"lists": n, "same_list": same_list / max(n, 1), "same_set": same_set / max(n, 1),
            "overlap": overlap / max(n, 1), "same_examples": same_examples / max(len(texts), 1)}


def main() -> int:
    args = parse_args()
    import torch

    from augment.augmenter import Augmenter
    from augment.build import augment_params
    from augment.config import AugmentConfig, JobConfig, MLMConfig
    from augment.glove import GloveNeighbours, load_glove
    from augment.int8 import quantize_encoder
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
    n = len(texts)
    n_ref = min(n, args.reference_sample or 200)
    print(f"start: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, torch threads {torch.get_num_threads()}, cpus "
          f"{os.cpu_count()}, load average {os.getloadavg()}")
    print(f"sample: {n} sentences of {train}; reference timed on the first {n_ref}"
          + (f" and scaled x{n / n_ref:.2f} to {n}" if n_ref < n else ""))

    print(f"masked-LM batch {args.batch_size or 'default (32 on the CPU)'}, job chunks "
          f"{args.chunk_size or 'default (64)'}, chunks per group {args.chunks_per_group or 'auto'}, {args.workers} workers")
    head = args.mlm_head or fit_quick_head(train, spec, work)
    lms = {"fp32": load_masked_lm(None, head, "cpu")}
    if "int8_dynamic" in args.mlm_precision:
        lms["int8_dynamic"] = load_masked_lm(None, head, "cpu")
        quantize_encoder(lms["int8_dynamic"])
    glove = load_glove(vocab_size=100_000)
    splitter = WordSplitter(lms["fp32"].tokenizer)
    stopwords = load_stopwords()
    rows: list[Row] = []
    for source in args.sources:
        precisions = ["fp32"] if source == "glove" else args.mlm_precision
        want = None  # fp32 reference output on the subset
        t_ref = None
        fp32_aug = None
        for precision in precisions:
            job = {"num_workers": args.workers, "progress": False, "chunks_per_group": args.chunks_per_group}
            if args.chunk_size is not None:
                job["chunk_size"] = args.chunk_size
            cfg = AugmentConfig(
                input=str(sample_file), output=str(work / f"out_{source}_{precision}.tsv"), num_new=args.num_new,
                seed=args.seed, candidate_source=source,
                mlm=MLMConfig(head=head, batch_size=args.batch_size, device="cpu", precision=precision),
                job=JobConfig(**job),
            )
            params = augment_params(cfg)
            loads = [load1()]
            if want is None:
                ref = ReferenceAugmenter(splitter, stopwords, params, glove, lms["fp32"])
                t0 = time.perf_counter()
                want = [ref.augment_one([t], args.seed, i) for t, i in zip(texts[:n_ref], lines[:n_ref])]
                t_ref = (time.perf_counter() - t0) * n / n_ref
                loads.append(load1())
            aug = Augmenter(splitter, stopwords, params, GloveNeighbours(glove, params.num_candidates), lms[precision])
            if precision == "fp32":
                fp32_aug = aug
            got, t_batch = None, None
            if not args.no_batched:
                t0 = time.perf_counter()
                got = aug.augment([[t] for t in texts], lines, args.seed)
                t_batch = time.perf_counter() - t0
                loads.append(load1())
                if precision == "fp32":
                    assert got[:n_ref] == want, f"{source}: batched output differs from the reference"
            t0 = time.perf_counter()
            run_shard(cfg)
            t_job = time.perf_counter() - t0
            loads.append(load1())
            out_rows, _ = read_task_file(cfg.output, spec)
            job_texts = [e.text_a for e in out_rows]
            if got is not None:
                assert job_texts == _rows(texts, got), f"{source} ({precision}): job output differs from batched"
            row = Row(source, precision, n, t_ref, t_batch, t_job, loads)
            if precision == "fp32":
                expected = _rows(texts[:n_ref], want)
                assert job_texts[: len(expected)] == expected, f"{source}: job output differs from the reference"
            else:
                if fp32_aug is None:
                    fp32_aug = Augmenter(splitter, stopwords, augment_params(_with_precision(cfg, "fp32")),
                                         GloveNeighbours(glove, params.num_candidates), lms["fp32"])
                row.agreement = candidate_agreement(fp32_aug, aug, texts[:n_ref], lines[:n_ref], args.seed)
            rows.append(row)
            print(_line(row), flush=True)

    print(f"\nend: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load average {os.getloadavg()}")
    print(f"\n| candidates | masked LM | reference (sent/s{', scaled' if n_ref < n else ''}) | batched, 1 process (sent/s) "
          f"| job, {args.workers} workers (sent/s) | batched / ref | job / ref | 1-min load during |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = f"{r.n / r.t_batch:.2f}" if r.t_batch else "-"
        rb = f"{r.t_ref / r.t_batch:.1f}x" if r.t_batch else "-"
        print(f"| {r.source} | {r.precision if r.source != 'glove' else '-'} | {r.n / r.t_ref:.2f} | {b} | "
              f"{r.n / r.t_job:.2f} | {rb} | {r.t_ref / r.t_job:.1f}x | {min(r.loads):.1f}-{max(r.loads):.1f} |")
    print(f"(reference: fp32, first {n_ref} of {n} sentences" + (", time scaled to all" if n_ref < n else "")
          + "; job time includes starting the workers: imports, model and GloVe loading)")
    for r in rows:
        if r.agreement:
            a = r.agreement
            print(f"{r.source} int8_dynamic vs fp32 on {n_ref} sentences: {a['lists']} masked-LM lists, identical "
                  f"{a['same_list']:.1%} (as sets {a['same_set']:.1%}), mean set overlap {a['overlap']:.1%}; "
                  f"examples with identical new sentences {a['same_examples']:.1%}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def _with_precision(cfg, precision: str):
    import dataclasses

    return dataclasses.replace(cfg, mlm=dataclasses.replace(cfg.mlm, precision=precision))


def _line(r: Row) -> str:
    b = f", batched {r.n / r.t_batch:.2f}/s" if r.t_batch else ""
    return (f"{r.source} ({r.precision}): reference {r.n / r.t_ref:.2f}/s{b}, job {r.n / r.t_job:.2f}/s; "
            f"load {', '.join(f'{x:.1f}' for x in r.loads)}")


if __name__ == "__main__":
    sys.exit(main())
