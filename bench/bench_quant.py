"""Quantization benchmarks on the BERT-base shape (random init, CPU).

(a) time to quantize every weight of BERT-base once (the 72 encoder linears + word embedding, plus the pooler
    for the reference preset);
(b) quantized forward vs the fp32 forward of the same model, batch 8 × sequence 128, eval mode, no grad,
    repetitions interleaved in one run; "fp32" is HF's default (SDPA) attention, "fp32 kdqat attention" the
    same weights through the kdqat eager attention function that the quantized model uses; "cached" reuses the quantized weights between forwards (eval mode,
    unchanged latent weights), "uncached" re-quantizes every weight in every forward (what a training-mode
    forward pays);
(c) packed export size vs the fp32 checkpoint (2-bit and base-3 ternary codes).

Usage: python bench/bench_quant.py [--reps N] [--threads T] [--skip-size]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import safetensors.torch  # noqa: E402
import torch  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

from ds_kdqat.models.attention import use_kdqat_attention  # noqa: E402
from ds_kdqat.quant import QuantConfig, export_packed, quantize_model  # noqa: E402
from ds_kdqat.quant.modules import QUANT_MODULE_TYPES  # noqa: E402


def bert_base() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(num_labels=2)).eval()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def quantize_all_once(model) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, QUANT_MODULE_TYPES):
                module.weight_quant(module.weight)


def clear_caches(model) -> None:
    for module in model.modules():
        if isinstance(module, QUANT_MODULE_TYPES):
            module.clear_quant_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-size", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, nproc {os.cpu_count()}, "
          f"load average at start {os.getloadavg()}")

    fp32 = bert_base()
    models = {}
    for preset in ("ternarybert", "ternarybert_reference"):
        model = copy.deepcopy(fp32)
        quantize_model(model, QuantConfig(preset=preset))
        models[preset] = model

    # (a) quantize every weight once
    for preset, model in models.items():
        times = [timed(lambda: quantize_all_once(model)) for _ in range(args.reps)]
        print(f"(a) {preset}: quantize all weights once: median {statistics.median(times):.3f} s, "
              f"min {min(times):.3f} s over {args.reps}")

    # (b) forward, interleaved
    torch.manual_seed(1)
    ids = torch.randint(0, 30522, (8, 128))
    mask = torch.ones_like(ids)
    quant = models["ternarybert"]
    fp32_kdqat = copy.deepcopy(fp32)  # the teacher's path: fp32 through the kdqat (eager) attention function
    use_kdqat_attention(fp32_kdqat)
    run = {
        "fp32": lambda: fp32(input_ids=ids, attention_mask=mask),
        "fp32 kdqat attention": lambda: fp32_kdqat(input_ids=ids, attention_mask=mask),
        "quant cached": lambda: quant(input_ids=ids, attention_mask=mask),
        "quant uncached": lambda: (clear_caches(quant), quant(input_ids=ids, attention_mask=mask)),
    }
    samples = {k: [] for k in run}
    with torch.no_grad():
        for fn in run.values():  # warm-up (fills the cache)
            fn()
        for _ in range(args.reps):
            for name, fn in run.items():
                samples[name].append(timed(fn))
    base = statistics.median(samples["fp32"])
    for name, values in samples.items():
        ratios = [v / f for v, f in zip(values, samples["fp32"])]
        print(f"(b) forward {name}: median {statistics.median(values):.3f} s, min {min(values):.3f} s; "
              f"ratio to fp32 median-of-medians {statistics.median(values) / base:.3f}, "
              f"median per-rep ratio {statistics.median(ratios):.3f}")

    # (c) packed size
    if not args.skip_size:
        with tempfile.TemporaryDirectory() as tmp:
            fp32_file = Path(tmp) / "fp32.safetensors"
            safetensors.torch.save_file({k: v.contiguous() for k, v in fp32.state_dict().items()}, fp32_file)
            print(f"(c) fp32 safetensors checkpoint: {fp32_file.stat().st_size / 2**20:.1f} MiB")
            for preset, model in models.items():
                for packing in ("2bit", "base3"):
                    out = Path(tmp) / f"{preset}-{packing}"
                    seconds = timed(lambda: export_packed(model, out, ternary_packing=packing))
                    report = export_packed(model, out, ternary_packing=packing)
                    print(f"(c) {preset} {packing}: {report.row()}; file/fp32-file ratio "
                          f"{fp32_file.stat().st_size / report.packed_bytes:.2f}; export took {seconds:.1f} s")
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
