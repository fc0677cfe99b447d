"""Activation checkpointing (``kdqat.train.activation_checkpointing``): peak memory of one KD-QAT micro step with
and without it, measured on CPU, next to the estimator's figure for the same step.

The step is :func:`ds_kdqat.distill.step.kd_forward` (teacher without gradients, student with taps and the
phase's interventions, the objective) + ``backward`` on a random-init BERT (default: 4 layers, hidden 256, 4 heads,
FFN 1024, vocabulary 30,522, dropout 0.1) quantized with the ``ternarybert`` preset, sequence 128, micro batch 8.
*Measured*: the peak of the bytes of live tensor storages created during the step (a ``TorchDispatchMode`` sees
every op's outputs; a storage counts from its creation until it is freed): activations, saved tensors, taps,
quantized weight copies, gradients; the weights (created before) are not counted. *Estimate*: the parts of the
estimator's ``forward/backward`` phase that the step allocates (activations, quantized weight copies, taps,
gradients, backward workspace; ``ds-kdqat estimate --device cpu``, ZeRO-0, one rank).

``--no_codes`` also runs the quantized linears and attention matmuls without their saved-tensor hooks (which save
the fake-quantized operands as integer codes, :mod:`ds_kdqat.quant.codes`; ``fp32_saves``), to show how they combine
with checkpointing: inside a checkpointed layer, PyTorch applies only the innermost saved-tensor hooks, so what those
ops save is kept (as codes) instead of being dropped.

    python bench/bench_checkpointing.py
    python bench/bench_checkpointing.py --layers 2 --batch 4 --recipes ternarybert --no_codes
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MiB = 2**20
PHASES = {"ternarybert": ("ternarybert", "kd"), "map": ("map", "kd"), "ti_map": ("ti_map", "ti_map"),
          "ti_output": ("ti_output", "ti_output")}


class LiveBytes(TorchDispatchMode):
    """Bytes of the live storages created by ops run under the mode, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.tracked: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self.tracked.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided:
                storage = tensor.untyped_storage()
                key, nbytes = id(storage), storage.nbytes()
                if nbytes and key not in self.tracked:
                    self.tracked.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._release, key, nbytes)
        return out


def make_models(args):
    from transformers import BertConfig, BertForSequenceClassification

    from ds_kdqat.quant import quantize_model

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=args.heads, intermediate_size=args.ffn, max_position_embeddings=512,
                        num_labels=2)
    teacher = BertForSequenceClassification(config).eval()
    student = copy.deepcopy(teacher)
    quantize_model(student, {"preset": "ternarybert"})
    return teacher, student.train()


def no_codes():
    """The quantized linears and attention matmuls saving their fake-quantized operands as they are (float)."""
    from ds_kdqat.quant.codes import fp32_saves

    return fp32_saves()


def measure(teacher, student, recipe: str, checkpointing: bool, args) -> int:
    from ds_kdqat.distill import DistillConfig, kd_forward, kd_phases
    from ds_kdqat.models.checkpointing import enable_activation_checkpointing

    recipe_name, phase_name = PHASES[recipe]
    phases = {p.name: p for p in kd_phases(DistillConfig(recipe=recipe_name), 100, args.layers, "classification")[0]}
    model = copy.deepcopy(student)
    if checkpointing:
        enable_activation_checkpointing(model)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 30000, (args.batch, args.seq), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
             "labels": torch.zeros(args.batch, dtype=torch.long)}
    kd_forward(teacher, model, batch, phases[phase_name])[0].backward()  # warm-up (LSQ, caches, lazy imports)
    model.zero_grad(set_to_none=True)
    with LiveBytes() as mode:
        loss, _ = kd_forward(teacher, model, batch, phases[phase_name])
        loss.backward()
        del loss
    return mode.peak


def estimated(recipe: str, checkpointing: bool, args) -> int:
    from ds_kdqat.config import parse_config
    from ds_kdqat.estimate import ShapeFlags, estimate_run

    run = parse_config({"train_micro_batch_size_per_gpu": args.batch,
                        "kdqat": {"distill": {"recipe": PHASES[recipe][0]}, "data": {"max_seq_length": args.seq}}})
    flags = ShapeFlags(args.layers, args.hidden, args.heads, args.ffn, 30522, "bert")
    est = estimate_run(run, device="cpu", shape_flags=flags, activation_checkpointing=checkpointing).estimate
    parts = est.components["forward/backward"]
    step = ("activations", "quantized weight copies", "taps", "gradients", "backward workspace")
    return sum(parts.get(name, 0) for name in step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--recipes", default="ternarybert,map,ti_map")
    parser.add_argument("--no_codes", action="store_true", help="also measure without the saved-as-codes hooks")
    parser.add_argument("--no_estimate", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    teacher, student = make_models(args)
    print(f"BERT {args.layers} layers, hidden {args.hidden}, {args.heads} heads, FFN {args.ffn}, seq {args.seq}, "
          f"batch {args.batch}; ternarybert preset; one KD-QAT micro step (forward + backward), peak MiB\n")
    variants = [("codes", contextlib.nullcontext)] + ([("no codes", no_codes)] if args.no_codes else [])
    header = ["recipe (phase)"] + [f"{'on' if c else 'off'}" + (f", {v}" if args.no_codes else "")
                                   for v, _ in variants for c in (False, True)]
    if not args.no_estimate:
        header += ["estimate off", "estimate on"]
    print("| " + " | ".join(header) + " |\n|---|" + "---:|" * (len(header) - 1))
    for recipe in args.recipes.split(","):
        cells = []
        for _, context in variants:
            with context():
                for checkpointing in (False, True):
                    cells.append(measure(teacher, student, recipe, checkpointing, args))
        if not args.no_estimate:
            cells += [estimated(recipe, c, args) for c in (False, True)]
        print(f"| {recipe} ({PHASES[recipe][1]}) | " + " | ".join(f"{c / MiB:,.1f}" for c in cells) + " |",
              flush=True)


if __name__ == "__main__":
    main()
