"""One KD-QAT step vs one plain fp32 fine-tuning step of the same encoder: time (interleaved, one process)
and peak memory (each mode in its own subprocess).

KD-QAT step  = teacher forward with taps (no autograd) + student forward with taps (W2-E2-A8 student from
               ``quantize_model``) + KD losses of the recipe + backward + AdamW step.
plain step   = forward with labels (cross-entropy) + backward + AdamW step of the fp32 model.

Default shape: BERT-base (12 layers, hidden 768, 12 heads, FFN 3072), sequence 128, batch 8, random weights
(no hub here). Peak memory is the peak resident set size (VmHWM, else ``ru_maxrss``) of a fresh process that
imports the libraries, builds the model(s) and optimizer and runs ``--memory-steps`` steps: interpreter,
libraries, weights, gradients, optimizer state and activations are all counted. The memory children run
before the timing so the parent is still small.

    python bench/bench_kd_step.py                     # timing + memory, BERT-base shape
    python bench/bench_kd_step.py --layers 2 --hidden 128 --heads 2 --ffn 512 --steps 2   # quick check
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

from ds_kdqat.distill import DistillConfig, PhaseSpan, build_objective, distill_phase, kd_forward  # noqa: E402
from ds_kdqat.quant import QuantConfig, quantize_model  # noqa: E402
from ds_kdqat.training.teacher import convert_teacher  # noqa: E402


def make_model(args) -> BertForSequenceClassification:
    config = BertConfig(vocab_size=30522, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=args.heads, intermediate_size=args.ffn, max_position_embeddings=512,
                        num_labels=2, attn_implementation=args.plain_attention)
    torch.manual_seed(0)
    return BertForSequenceClassification(config)


def make_batch(args) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.seq // 2, args.seq + 1, (args.batch,), generator=g)
    mask = (torch.arange(args.seq)[None] < lengths[:, None]).long()
    ids = torch.randint(1000, 30522, (args.batch, args.seq), generator=g) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": torch.randint(0, 2, (args.batch,), generator=g)}


class PlainStep:
    def __init__(self, args):
        self.model = make_model(args).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)

    def __call__(self, batch) -> dict[str, float]:
        t0 = time.perf_counter()
        loss = self.model(**batch).loss
        t1 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        self.optimizer.step()
        t3 = time.perf_counter()
        return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "total": t3 - t0}


class KDStep:
    def __init__(self, args, quantize: bool = True, integer_forward: bool = False, teacher_precision: str = "fp32"):
        self.teacher = make_model(args).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        student = copy.deepcopy(self.teacher)
        for p in student.parameters():
            p.requires_grad_(True)
        convert_teacher(self.teacher, teacher_precision)
        if quantize:
            quantize_model(student, QuantConfig(integer_forward=integer_forward))
        self.student = student.train()
        # the plain KD phase of the recipe (no interventions), as one step of the engine runs it
        self.phase = distill_phase(PhaseSpan("kd", 0, 1), build_objective(DistillConfig(recipe=args.recipe),
                                                                          args.layers), ())
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=1e-5)
        self.teacher_context = torch.inference_mode if args.teacher_mode == "inference" else torch.no_grad

    def __call__(self, batch) -> dict[str, float]:
        marks: dict[str, float] = {}
        t0 = time.perf_counter()
        # the step's forward half; it drops both models' taps before returning (the loss graph keeps what
        # its backward needs), which frees e.g. the attention scores before the backward's peak
        loss, _ = kd_forward(self.teacher, self.student, batch, self.phase, teacher_context=self.teacher_context,
                             mark=lambda name: marks.__setitem__(name, time.perf_counter()))
        t1, t2, t3 = marks["teacher_forward"], marks["student_forward"], marks["losses"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t4 = time.perf_counter()
        self.optimizer.step()
        t5 = time.perf_counter()
        return {"teacher_forward": t1 - t0, "student_forward": t2 - t1, "losses": t3 - t2, "backward": t4 - t3,
                "optimizer": t5 - t4, "total": t5 - t0}


def time_all(args) -> dict:
    batch = make_batch(args)
    steps = make_steps(args)
    for _ in range(args.warmup):
        for step in steps.values():
            step(batch)
    runs = {mode: [] for mode in steps}
    for _ in range(args.steps):  # interleaved so every mode sees the same machine load
        for mode, step in steps.items():
            runs[mode].append(step(batch))
    summary = {"modes": {}, "ratios": {}}
    for mode, timings in runs.items():
        summary["modes"][mode] = {key: statistics.median(t[key] for t in timings) for key in timings[0]}
        summary["ratios"][mode] = [t["total"] / p["total"] for p, t in zip(runs["plain"], timings)]
    return summary


CHEAP_TEACHERS = ("bf16", "int8_dynamic")


def modes_of(args) -> list[str]:
    teachers = [p for p in (args.teacher_precisions or "").split(",") if p]
    return (["plain", "kd"] + (["kd_int"] if args.integer_forward else [])
            + [f"kd_teacher_{p}" for p in teachers]
            + ([f"kd_int_teacher_{p}" for p in teachers] if args.integer_forward else [])
            + (["kd_fp"] if args.with_fp_student else []))


def make_steps(args, only: str | None = None) -> dict:
    """plain: fp32 fine-tuning; kd: KD-QAT with the W2-E2-A8 student; kd_int: the same with
    ``kdqat.quant.integer_forward``; kd_fp: the same KD step with an unquantized student (separates the
    distillation's own cost from the quantizers')."""
    factories = {"plain": lambda: PlainStep(args), "kd": lambda: KDStep(args),
                 "kd_int": lambda: KDStep(args, integer_forward=True),
                 "kd_fp": lambda: KDStep(args, quantize=False)}
    for p in CHEAP_TEACHERS:
        factories[f"kd_teacher_{p}"] = lambda p=p: KDStep(args, teacher_precision=p)
        factories[f"kd_int_teacher_{p}"] = lambda p=p: KDStep(args, integer_forward=True, teacher_precision=p)
    return {mode: factories[mode]() for mode in ([only] if only else modes_of(args))}


def peak_rss_mib() -> float:
    """Peak resident set size of this process: VmHWM (Linux; belongs to this process image only), else
    ``ru_maxrss``, which Linux carries over from the parent across fork+exec (so it can report the parent's
    peak when that is higher)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(args) -> None:
    batch = make_batch(args)
    (step,) = make_steps(args, only=args.child).values()
    for _ in range(args.memory_steps):
        step(batch)
    print(json.dumps({"mode": args.child, "peak_rss_mib": peak_rss_mib()}))


def memory_all(args) -> dict:
    result = {}
    for mode in modes_of(args):
        command = [sys.executable, __file__, "--child", mode] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k not in ("child", "skip_time", "skip_memory", "with_fp_student", "integer_forward",
                         "teacher_precisions") and v is not None]
        out = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ.copy())
        result[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--ffn", type=int, default=3072)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--recipe", default="ternarybert")
    parser.add_argument("--teacher-mode", choices=("no_grad", "inference"), default="inference")
    parser.add_argument("--plain-attention", choices=("eager", "sdpa"), default="eager",
                        help="attention of the plain fp32 model (the KD models always use kdqat = eager math)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--with-fp-student", action="store_true",
                        help="also run the KD step with an unquantized student (kd_fp)")
    parser.add_argument("--integer-forward", action="store_true",
                        help="also run the KD step with kdqat.quant.integer_forward (kd_int)")
    parser.add_argument("--teacher-precisions", default="",
                        help="comma-separated kdqat.model.teacher_precision values besides fp32 to run the KD step "
                             "with (bf16, int8_dynamic): modes kd_teacher_<p> (and kd_int_teacher_<p>)")
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        memory_child(args)
        return
    print(f"shape: layers={args.layers} hidden={args.hidden} heads={args.heads} ffn={args.ffn} seq={args.seq} "
          f"batch={args.batch}; recipe={args.recipe}; teacher under {args.teacher_mode}; plain attention "
          f"{args.plain_attention}; torch threads={torch.get_num_threads()}; load avg {os.getloadavg()}")
    if not args.skip_memory:
        memory = memory_all(args)
        print("peak RSS: " + ", ".join(f"{mode} {mib:.0f} MiB ({mib / memory['plain']:.2f}x plain)"
                                       for mode, mib in memory.items()))
    if not args.skip_time:
        summary = time_all(args)
        for mode, parts in summary["modes"].items():
            text = ", ".join(f"{k} {v:.3f}s" for k, v in parts.items())
            print(f"time/step {mode:5s} (median of {args.steps}): {text}")
        for mode, ratios in summary["ratios"].items():
            if mode != "plain":
                print(f"time ratio {mode}/plain: median {statistics.median(ratios):.2f} "
                      f"(per interleaved round: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
