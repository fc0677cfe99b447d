"""Estimate the per-rank memory of a KD-QAT run before starting it: will it fit?

    ds-kdqat estimate --ds_config ds_configs/zero3_bert_large.json --world_size 8 --gpu_memory 80GB
    ds-kdqat estimate --ds_config ds_configs/zero3_ulm_large.json --family t5 --layers 24 --hidden 1024 \\
        --heads 16 --ffn 2816 --vocab 32128 --set bf16.enabled=true --world_size 8 --gpu_memory 48GiB
    python run/estimate.py --ds_config ds_configs/ternary.json --device cpu --json

Prints per-rank memory by part (student weights, gradients, fp32 master copies, optimizer states per ZeRO stage and
offload setting, quantized weight copies, LAT state, teacher weights, activations, taps, ZeRO buffers, fixed
overhead) at the run's peak phase, the other phases' totals, and with --gpu_memory the largest micro batch that
fits and, when the configured one does not, what would make it fit. The model is the config's
kdqat.model.teacher, or --model, or the shape flags (--layers --hidden --heads --ffn --vocab [--family]).
--json prints the same as one JSON object (per_rank_total_bytes, parts, phases, inputs, …).
How it is computed, what it includes and leaves out: ds_kdqat/estimate/memory.py and README "Will it fit?".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", required=True,
                        help="ds_config JSON: DeepSpeed's keys plus the 'kdqat' section (what run/train.py takes)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, as for train (repeatable)")
    parser.add_argument("--model", help="model folder, hub id or embedded:all-minilm-l6-v2 (default: the "
                                        "config's kdqat.model.teacher)")
    shape = parser.add_argument_group("model by shape (instead of a checkpoint; all of --layers --hidden --heads "
                                      "--ffn)")
    shape.add_argument("--layers", type=int, help="transformer layers")
    shape.add_argument("--hidden", type=int, help="hidden size")
    shape.add_argument("--heads", type=int, help="attention heads")
    shape.add_argument("--ffn", type=int, help="FFN size (T5: the gated FFN's d_ff)")
    shape.add_argument("--vocab", type=int, default=30522, help="vocabulary size (default 30522)")
    shape.add_argument("--family", default="bert", help="bert (default), distilbert, t5 or vit")
    shape.add_argument("--image_size", type=int, default=224, help="vit: image size (default 224)")
    shape.add_argument("--patch_size", type=int, default=16, help="vit: patch size (default 16)")
    parser.add_argument("--seq", type=int, help="sequence length (default: kdqat.data.max_seq_length)")
    parser.add_argument("--world_size", type=int, default=1, help="data-parallel ranks (default 1)")
    parser.add_argument("--gpu_memory", help="memory per rank, e.g. 48GiB, 80GB (with --device cpu: RAM per "
                                             "rank); enables the largest-micro-batch search and recommendations")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cuda (default): GPU memory, with CUDA context, NCCL and allocator allowances; cpu: "
                             "resident memory of a CPU rank, with the process's fixed overhead")
    checkpointing = parser.add_mutually_exclusive_group()
    checkpointing.add_argument("--activation_checkpointing", dest="activation_checkpointing", action="store_true",
                               default=None, help="estimate with activation checkpointing (default: the config's "
                                                  "kdqat.train.activation_checkpointing, default off)")
    checkpointing.add_argument("--no_activation_checkpointing", dest="activation_checkpointing",
                               action="store_false")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")


def run(args: argparse.Namespace) -> int:
    from ..estimate.report import to_json, to_table

    # libraries that log to stdout as they load (DeepSpeed's accelerator detection) would spoil --json
    with contextlib.redirect_stdout(sys.stderr):
        result = _estimate(args)
    print(json.dumps(to_json(result), indent=1) if args.json else to_table(result))
    return 0


def _estimate(args: argparse.Namespace):
    from ..config import load_config
    from ..errors import ConfigError
    from ..estimate import ShapeFlags, estimate_run, parse_size

    run_config = load_config(args.ds_config, list(args.overrides))
    given = {name: getattr(args, name) for name in ("layers", "hidden", "heads", "ffn")}
    flags = None
    if any(value is not None for value in given.values()):
        missing = [f"--{name}" for name, value in given.items() if value is None]
        if missing:
            raise ConfigError(missing[0], f"a model given by its shape needs --layers --hidden --heads --ffn; "
                              f"missing {', '.join(missing)}")
        if args.model:
            raise ConfigError("--model", "give either --model or the shape flags, not both")
        flags = ShapeFlags(args.layers, args.hidden, args.heads, args.ffn, args.vocab, args.family,
                           args.image_size, args.patch_size)
    budget = parse_size(args.gpu_memory) if args.gpu_memory is not None else None
    return estimate_run(run_config, world_size=args.world_size, device=args.device, gpu_memory=budget,
                        shape_flags=flags, model=args.model, seq=args.seq,
                        activation_checkpointing=args.activation_checkpointing)
