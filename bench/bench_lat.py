"""LAT against TWN, and this tree's LAT against an earlier revision's, interleaved in one run.

Two measurements, each done by two worker processes, one importing ``ds_kdqat`` from this working tree
("after"), one from a git revision extracted into a temporary folder (``--before``, default ``HEAD``;
``--before none`` runs this tree alone); the parent alternates one repetition of every (worker, mode) so that
all of them see the same machine load.

(a) ``quant``: the quantizers' work in one training step on BERT-base-shaped weights (random; the 72 encoder
    linears and the word embedding, 30522 × 768, row-wise), batch ``--batch`` × ``--seq`` tokens:
    forward (every linear's fake-quantized weight in training mode, with autograd; the embedding's lookup
    through its quantizer), backward of fixed random output gradients through all of them, and the LAT update
    after the step (``after_optimizer_step``; "after": reading the optimizer's second moment, a BertAdam whose
    ``exp_avg_sq`` is set to the same random ``v``; "before": whatever that revision does, its own estimate).
    No model matmuls: this is the part of a step the weight quantizer decides.
(b) ``step`` (``--step``): one whole KD-QAT step (teacher and student forward, the ternarybert recipe's losses,
    backward, BertAdam step, LAT update) of a smaller encoder, by default the main job's (MiniLM-L6 shape:
    6 layers, hidden 384, 12 heads, FFN 1536, batch 32 × sequence 64), TWN student vs LAT student.

    python bench/bench_lat.py                      # (a), HEAD vs this tree, 5 repetitions
    python bench/bench_lat.py --step --reps 3      # (a) and (b)
    python bench/bench_lat.py --before none        # this tree only
    python bench/bench_lat.py --step --skip-quant  # (b) only
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------------------
# worker (runs against whichever ds_kdqat is first on sys.path)


def _worker(args) -> None:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    import ds_kdqat.quant.lat as lat_module
    from ds_kdqat.quant import QuantConfig, after_optimizer_step, quantize_model
    from ds_kdqat.quant.modules import QuantEmbedding, QuantLinear
    from ds_kdqat.training.optim import BertAdam

    if args.threads:
        torch.set_num_threads(args.threads)
    takes_optimizer = "optimizer" in inspect.signature(after_optimizer_step).parameters

    def lat_modules(model):
        return [m for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))
                and m.weight_quant.method == "lat"]

    def prepare(model, seed):
        """Give every LAT weight the same random second moment, as the optimizer (this tree) or as the
        quantizer's own estimate (a tree without the optimizer source); returns the optimizer to read from."""
        modules = lat_modules(model)
        if not modules:
            return None
        optimizer = BertAdam([m.weight for m in modules], lr=1e-5)
        g = torch.Generator().manual_seed(seed)
        for m in modules:
            v = torch.rand(m.weight.shape, generator=g).pow_(4).mul_(1e-6)
            m.weight_quant.second_moment = v
            optimizer.state[m.weight] = {"step": torch.zeros(()), "exp_avg": torch.zeros_like(v), "exp_avg_sq": v}
        return optimizer

    def lat_update(model, optimizer):
        if takes_optimizer and optimizer is not None:
            return after_optimizer_step(model, optimizer=optimizer)
        return after_optimizer_step(model)

    def bert_base(preset):
        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(num_labels=2))
        quantize_model(model, QuantConfig(preset=preset))
        return model.train()

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 30522, (args.batch, args.seq), generator=gen)
    quant_models = {}

    def quant_setup(mode):
        model = bert_base("ternarybert_lat" if mode == "lat" else "ternarybert")
        modules = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
        grads = [torch.randn(m.weight.shape, generator=gen) if isinstance(m, QuantLinear)
                 else torch.randn(args.batch, args.seq, m.weight.shape[1], generator=gen) for m in modules]
        return model, modules, grads, prepare(model, 2)

    def quant_rep(mode):
        if mode not in quant_models:
            quant_models[mode] = quant_setup(mode)
            quant_rep(mode)  # warm-up (and, here, the first step that settles the LAT source)
        model, modules, grads, optimizer = quant_models[mode]
        start = time.perf_counter()
        outs = [m.quantized_weight() if isinstance(m, QuantLinear) else m(ids) for m in modules]
        mid = time.perf_counter()
        torch.autograd.backward(outs, grads)
        back = time.perf_counter()
        lat_update(model, optimizer)
        end = time.perf_counter()
        for m in modules:
            m.weight.grad = None
        return {"forward": mid - start, "backward": back - mid, "update": end - back, "total": end - start}

    step_models = {}

    def step_setup(mode):
        import copy

        from ds_kdqat.distill import DistillConfig, PhaseSpan, build_objective, distill_phase, kd_forward

        config = BertConfig(vocab_size=30522, hidden_size=args.hidden, num_hidden_layers=args.layers,
                            num_attention_heads=args.heads, intermediate_size=args.ffn, max_position_embeddings=512,
                            num_labels=2)
        torch.manual_seed(0)
        teacher = BertForSequenceClassification(config).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        student = copy.deepcopy(teacher)
        for p in student.parameters():
            p.requires_grad_(True)
        quantize_model(student, QuantConfig(preset="ternarybert_lat" if mode == "lat" else "ternarybert"))
        student.train()
        phase = distill_phase(PhaseSpan("kd", 0, 1), build_objective(DistillConfig(recipe="ternarybert"),
                                                                      args.layers), ())
        optimizer = BertAdam(student.parameters(), lr=1e-5)
        g = torch.Generator().manual_seed(3)
        lengths = torch.randint(args.step_seq // 2, args.step_seq + 1, (args.step_batch,), generator=g)
        mask = (torch.arange(args.step_seq)[None] < lengths[:, None]).long()
        batch = {"input_ids": torch.randint(1000, 30522, (args.step_batch, args.step_seq), generator=g) * mask,
                 "attention_mask": mask, "token_type_ids": torch.zeros_like(mask),
                 "labels": torch.randint(0, 2, (args.step_batch,), generator=g)}
        return teacher, student, phase, optimizer, batch, kd_forward

    def step_rep(mode):
        if mode not in step_models:
            step_models[mode] = step_setup(mode)
            step_rep(mode)
        teacher, student, phase, optimizer, batch, kd_forward = step_models[mode]
        start = time.perf_counter()
        loss, _ = kd_forward(teacher, student, batch, phase)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lat_update(student, optimizer)
        return {"total": time.perf_counter() - start}

    print(json.dumps({"ready": True, "lat_module": lat_module.__file__}), flush=True)
    for line in sys.stdin:
        kind, mode = line.split()
        result = quant_rep(mode) if kind == "quant" else step_rep(mode)
        print(json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------------------
# parent


class Worker:
    def __init__(self, name: str, root: Path, args):
        self.name = name
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--threads", str(args.threads),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--layers", str(args.layers),
                   "--hidden", str(args.hidden), "--heads", str(args.heads), "--ffn", str(args.ffn),
                   "--step-batch", str(args.step_batch), "--step-seq", str(args.step_seq)]
        env = dict(os.environ, PYTHONPATH=str(root))
        self.proc = subprocess.Popen(command, cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        hello = json.loads(self.proc.stdout.readline())
        print(f"worker {name}: ds_kdqat from {Path(hello['lat_module']).parents[2]}")

    def run(self, kind: str, mode: str) -> dict:
        self.proc.stdin.write(f"{kind} {mode}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} died")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def extract(revision: str, into: Path) -> Path:
    archive = into / "tree.tar"
    subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), revision], cwd=REPO, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree"


def report(title: str, samples: dict[tuple[str, str], list[dict]], keys: list[str]) -> None:
    print(title)
    for (worker, mode), values in samples.items():
        parts = ", ".join(f"{k} {statistics.median(v[k] for v in values) * 1e3:.0f} ms" for k in keys)
        print(f"  {worker:6s} {mode}: median {parts} (total min {min(v['total'] for v in values) * 1e3:.0f} ms)")
    workers = sorted({w for w, _ in samples}, key=["before", "after"].index)
    for worker in workers:
        twn, lat = samples[(worker, "twn")], samples[(worker, "lat")]
        ratios = [b["total"] / a["total"] for a, b in zip(twn, lat)]
        print(f"  {worker}: LAT/TWN per interleaved round {', '.join(f'{r:.2f}' for r in ratios)}; "
              f"median {statistics.median(ratios):.2f}")
    if len(workers) == 2:
        old, new = samples[("before", "lat")], samples[("after", "lat")]
        ratios = [a["total"] / b["total"] for a, b in zip(old, new)]
        print(f"  LAT before/after per round {', '.join(f'{r:.2f}' for r in ratios)}; median "
              f"{statistics.median(ratios):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="HEAD", help="git revision to compare with, or 'none'")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch's default)")
    parser.add_argument("--batch", type=int, default=8, help="(a) tokens looked up: batch × seq")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--step", action="store_true", help="also (b), the whole KD-QAT step")
    parser.add_argument("--skip-quant", action="store_true", help="leave (a) out")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--ffn", type=int, default=1536)
    parser.add_argument("--step-batch", type=int, default=32)
    parser.add_argument("--step-seq", type=int, default=64)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    print(f"nproc {os.cpu_count()}, load average at start {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        roots = {"after": REPO}
        if args.before != "none":
            roots = {"before": extract(args.before, Path(tmp)), "after": REPO}
        workers = {name: Worker(name, root, args) for name, root in roots.items()}
        try:
            kinds = ([] if args.skip_quant else ["quant"]) + (["step"] if args.step else [])
            for kind in kinds:
                samples: dict[tuple[str, str], list[dict]] = {(w, m): [] for w in workers for m in ("twn", "lat")}
                for _ in range(args.reps):
                    for name, worker in workers.items():
                        for mode in ("twn", "lat"):
                            samples[(name, mode)].append(worker.run(kind, mode))
                if kind == "quant":
                    report(f"(a) quantizer work per training step, BERT-base shape, {args.batch}×{args.seq} tokens, "
                           f"{args.reps} rounds", samples, ["forward", "backward", "update", "total"])
                else:
                    report(f"(b) KD-QAT step, {args.layers} layers × hidden {args.hidden}, batch {args.step_batch} "
                           f"× {args.step_seq}, {args.reps} rounds", samples, ["total"])
        finally:
            for worker in workers.values():
                worker.close()
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
