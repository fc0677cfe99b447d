"""TinyBERT-style data augmentation of a task's train file (GLUE tsv in, GLUE tsv out; or, for a task described
by its columns, CSV / TSV / JSON Lines in, the same format out).

Examples::

    # embedded default: rt_polarity train split, packaged MiniLM + fitted head, packaged GloVe 50-d
    ds-kdqat fit-mlm-head --task rt_polarity --output heads/minilm_mlm.safetensors
    ds-kdqat augment --mlm_head heads/minilm_mlm.safetensors --num_workers 2

    # a GLUE task with bert-base-uncased (its own masked-LM head) and glove.6B.300d.txt, 8 ranks
    torchrun --nproc_per_node 8 run/augment.py --task rte --input glue/RTE/train.tsv \\
        --output glue/RTE/train_aug.tsv --mlm_model bert-base-uncased --glove glove.6B.300d.txt

    # your own CSV file (task custom, as kdqat.data describes it): writes data/train_aug.csv
    ds-kdqat augment --input data/train.csv --text_column text --label_column label --N 20 --mlm_head heads/h.safetensors

Each rank runs its shard (RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS, or --shard_index/--num_shards);
the last one to finish merges. A killed job resumes where it stopped when started again with the same
arguments. ``--merge_only`` merges the parts of a finished job.
"""

from __future__ import annotations

import argparse
import logging

from augment.config import AugmentConfig, GloveConfig, JobConfig, MLMConfig

DESCRIPTION = __doc__


def add_arguments(p: argparse.ArgumentParser) -> None:
    d, g, m, j = AugmentConfig(), GloveConfig(), MLMConfig(), JobConfig()
    p.add_argument("--task", default=None, help=f"task name (layout and default N), or 'custom' for a CSV/TSV/JSONL "
                   f"file with --text_column/--label_column (implied by them); default {d.task}")
    p.add_argument("--text_column", action="append", default=None,
                   help="task custom: a text column of the input (give it twice for a pair); default text")
    p.add_argument("--label_column", default=None, help="task custom: the label column; default label")
    p.add_argument("--format", choices=["csv", "tsv", "jsonl"], default=None,
                   help="task custom: the input's (and output's) format; default: from the extension")
    p.add_argument("--input", default=None, help="train file (default: the embedded task's train split)")
    p.add_argument("--output", default=None, help="augmented file (default: <input stem>_aug<input suffix>)")
    p.add_argument("--M", "--num_candidates", dest="num_candidates", type=int, default=d.num_candidates)
    p.add_argument("--p", "--replace_prob", dest="replace_prob", type=float, default=d.replace_prob)
    p.add_argument("--N", "--num_new", dest="num_new", type=int, default=None, help="draws per text (default: per task)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--candidate_source", choices=["mlm_glove", "glove", "mlm"], default=d.candidate_source)
    p.add_argument("--stopwords", default=None, help="stop-word file, one word a line (default: ours)")
    p.add_argument("--glove", default=g.path, help="glove.*.txt or packaged dir (default: packaged 6B 50-d)")
    p.add_argument("--glove_format", choices=["auto", "text", "packaged"], default=g.format)
    p.add_argument("--glove_vocab_size", type=int, default=g.vocab_size, help="0 = all words")
    p.add_argument("--mlm_model", default=m.model, help="BERT-family model dir or hub name (default: packaged MiniLM)")
    p.add_argument("--mlm_head", default=m.head, help="head fitted by `ds-kdqat fit-mlm-head` (.safetensors)")
    p.add_argument("--mlm_input", choices=["pair", "masked_only"], default=m.input)
    p.add_argument("--batch_size", type=int, default=m.batch_size,
                   help="masked copies per forward pass (default: 32 on the CPU, 64 on CUDA)")
    p.add_argument("--max_seq_length", type=int, default=m.max_seq_length)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=m.device)
    p.add_argument("--mlm_precision", choices=["fp32", "int8_dynamic"], default=m.precision,
                   help="the masked LM's encoder: fp32, or row-wise dynamic int8 linears (CPU only; faster, changes "
                        "some candidates)")
    p.add_argument("--num_workers", type=int, default=j.num_workers)
    p.add_argument("--shard_index", type=int, default=None)
    p.add_argument("--num_shards", type=int, default=None)
    p.add_argument("--chunk_size", type=int, default=j.chunk_size)
    p.add_argument("--chunks_per_group", type=int, default=j.chunks_per_group,
                   help="chunks a worker augments together, each still committed on its own (default: auto, up to "
                        "256 examples' worth)")
    p.add_argument("--parts_dir", default=None)
    p.add_argument("--on_bad_row", choices=["error", "skip"], default=j.on_bad_row)
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--no_merge", action="store_true", help="do not merge even when every chunk is done")
    p.add_argument("--merge_only", action="store_true", help="only merge the parts of a finished job")


def config_from_args(a: argparse.Namespace) -> AugmentConfig:
    """The :class:`~augment.config.AugmentConfig` of parsed arguments."""
    described = a.text_column is not None or a.label_column is not None or a.format is not None
    return AugmentConfig(
        task=a.task or ("custom" if described else AugmentConfig().task),
        input=a.input,
        text_columns=a.text_column,
        label_column=a.label_column,
        format=a.format,
        output=a.output,
        num_candidates=a.num_candidates,
        replace_prob=a.replace_prob,
        num_new=a.num_new,
        seed=a.seed,
        candidate_source=a.candidate_source,
        stopwords=a.stopwords,
        glove=GloveConfig(path=a.glove, format=a.glove_format, vocab_size=a.glove_vocab_size or None),
        mlm=MLMConfig(
            model=a.mlm_model, head=a.mlm_head, input=a.mlm_input, batch_size=a.batch_size,
            max_seq_length=a.max_seq_length, device=a.device, precision=a.mlm_precision,
        ),
        job=JobConfig(
            num_workers=a.num_workers, shard_index=a.shard_index, num_shards=a.num_shards,
            chunk_size=a.chunk_size, chunks_per_group=a.chunks_per_group, parts_dir=a.parts_dir, on_bad_row=a.on_bad_row,
            progress=not a.no_progress, merge=not a.no_merge,
        ),
    )


def run(args: argparse.Namespace) -> int:
    from augment.job import merge_only, run_shard

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(args)
    if args.merge_only:
        print(f"merged: {merge_only(cfg)}")
        return 0
    if cfg.job.num_workers == 1:  # this process does the work: keep its freed tensor memory for the next batches
        from ds_kdqat.allocator import retain_freed_memory

        retain_freed_memory()
    result = run_shard(cfg)
    print(
        f"shard {result.shard_index}/{result.num_shards}: {result.chunks_run} chunks run, "
        f"{result.chunks_done - result.chunks_run} already done"
        + (f"; merged into {result.merged}" if result.merged else "")
    )
    return 0
