"""Fit a BERT-style masked-LM head on an encoder that has none (e.g. the packaged MiniLM), together with its
top ``--unfreeze_layers`` layers (0: frozen encoder, head only).

    ds-kdqat fit-mlm-head --task rt_polarity --output heads/minilm_mlm.safetensors
    ds-kdqat fit-mlm-head --text corpus.txt --model path/to/encoder --output head.safetensors --unfreeze_layers 0

Sentences come from a plain-text file (one sentence a line) or from a task file's text fields; a share is
held out. Writes the head and the tuned layers (one safetensors file) and a JSON beside it, and prints the
held-out masked-token top-1 and top-15 accuracy before and after, and the share of held-out eligible
single-piece words found among their own 15 candidates (queried as the augmenter does).
Pass the head to ``ds-kdqat augment --mlm_head`` (it puts the tuned layers into the encoder it loads).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ConfigError

DESCRIPTION = __doc__


def add_arguments(p: argparse.ArgumentParser) -> None:
    from augment.fit_head import FitHeadOptions  # the defaults shown in --help (imports torch)

    o = FitHeadOptions()
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", help="plain-text file, one sentence a line")
    src.add_argument("--task", default="rt_polarity", help="task whose train sentences to use (default %(default)s)")
    p.add_argument("--task_file", default=None, help="the task's file (default: the embedded task's train split)")
    p.add_argument("--on_bad_row", choices=["error", "skip"], default="error")
    p.add_argument("--model", default=None, help="encoder dir or hub name (default: packaged MiniLM)")
    p.add_argument("--output", required=True, help="head file (.safetensors); a .json is written beside it")
    p.add_argument("--unfreeze_layers", type=int, default=o.unfreeze_layers,
                   help="top encoder layers trained with the head; 0 = frozen encoder (default %(default)s)")
    p.add_argument("--rounds", type=int, default=o.rounds, help="maskings per sentence (default %(default)s)")
    p.add_argument("--epochs", type=int, default=o.epochs, help="passes over all maskings (default %(default)s)")
    p.add_argument("--max_steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=o.lr, help="the head's learning rate (default %(default)s)")
    p.add_argument("--encoder_lr", type=float, default=o.encoder_lr,
                   help="the tuned layers' learning rate (default %(default)s)")
    p.add_argument("--weight_decay", type=float, default=o.weight_decay)
    p.add_argument("--warmup", type=float, default=o.warmup, help="share of steps warming up (default %(default)s)")
    p.add_argument("--batch_size", type=int, default=o.batch_size,
                   help="masked tokens per step, frozen encoder (default %(default)s)")
    p.add_argument("--sentence_batch", type=int, default=o.sentence_batch,
                   help="sentences per step, tuned layers (default %(default)s)")
    p.add_argument("--max_seq_length", type=int, default=o.max_seq_length)
    p.add_argument("--holdout", type=float, default=o.holdout)
    p.add_argument("--eval_words", type=int, default=o.eval_words,
                   help="held-out words for the candidate check; 0 skips it (default %(default)s)")
    p.add_argument("--eval_input", choices=["pair", "masked_only"], default=o.eval_input,
                   help="masked-LM input of the candidate check, as augment's --mlm_input (default %(default)s)")
    p.add_argument("--seed", type=int, default=o.seed)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where the encoder runs")


def read_sentences(args: argparse.Namespace) -> tuple[list[str], str]:
    """The training sentences and where they came from (``--text`` file, or the task file's text fields)."""
    if args.text is not None:
        try:
            lines = Path(args.text).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError("fit_mlm_head.text", f"cannot read {args.text}: {exc.strerror}") from exc
        return [ln.strip() for ln in lines if ln.strip()], args.text
    from augment.config import AugmentConfig
    from augment.job import default_input
    from ..data.glue_format import read_task_file
    from ..data.tasks import get_task

    spec = get_task(args.task, "fit_mlm_head.task")
    path = default_input(AugmentConfig(task=args.task, input=args.task_file, num_new=1), spec)
    examples, report = read_task_file(path, spec, on_bad_row=args.on_bad_row)
    for bad in report.bad_rows:
        print(f"skipped bad row {bad}", file=sys.stderr)
    texts = [e.text_a for e in examples] + [e.text_b for e in examples if e.text_b is not None]
    return texts, str(path)


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from augment.fit_head import FitHeadOptions, fit_mlm_head
    from augment.mlm import packaged_minilm_path, resolve_device
    from augment.mlm_head import save_head

    if args.threads:
        torch.set_num_threads(args.threads)
    opts = FitHeadOptions(
        unfreeze_layers=args.unfreeze_layers, rounds=args.rounds, epochs=args.epochs, max_steps=args.max_steps,
        lr=args.lr, encoder_lr=args.encoder_lr, weight_decay=args.weight_decay, warmup=args.warmup,
        batch_size=args.batch_size, sentence_batch=args.sentence_batch, max_seq_length=args.max_seq_length,
        holdout=args.holdout, eval_words=args.eval_words, eval_input=args.eval_input, seed=args.seed,
    )
    opts.validate()
    sentences, source = read_sentences(args)
    model = args.model or packaged_minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(model)
    encoder = AutoModel.from_pretrained(model).to(resolve_device(args.device))
    head, stats = fit_mlm_head(encoder, tokenizer, sentences, opts)
    weights, meta = save_head(head, args.output, {"encoder": model, "source": source, "fit": stats})
    print(f"wrote {weights} and {meta}")
    for line in summary_lines(stats, opts.num_candidates):
        print(line)
    return 0


def summary_lines(stats: dict, m: int) -> list[str]:
    """The fit's figures in words (held-out top-1 / top-m before and after; the candidate check)."""
    lines = [
        f"held-out masked-token accuracy: before top-1 {stats['heldout_top1_before']:.4f} / top-{m} "
        f"{stats[f'heldout_top{m}_before']:.4f}, after top-1 {stats['heldout_top1_after']:.4f} / top-{m} "
        f"{stats[f'heldout_top{m}_after']:.4f} ({stats['heldout_masked_tokens']} tokens)",
    ]
    recall = stats.get("candidate_recall")
    if recall:
        lines.append(f"held-out single-piece words among their own top-{m} candidates ({recall['input']} input): "
                     f"{recall['share']:.4f} ({recall['in_top']} of {recall['words']})")
    lines.append(f"tuned layers {stats['tuned_layers'] or 'none'}; {stats['steps']} steps; {stats['seconds']:.0f} s")
    return lines
