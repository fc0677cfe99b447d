"""Teacher–student training on a DeepSpeed engine: one stage of optimisation, resumable at the exact step.

A *stage* trains one model (the student) under ``deepspeed.initialize`` (ZeRO 0–3, fp32/bf16/fp16 as the
ds_config says) against an *objective*; the teacher, when there is one, is frozen, in eval mode and run
without gradients — under ZeRO-3 with ``kdqat.model.partition_teacher`` it gets an engine of its own so its
parameters are partitioned across ranks like the student's instead of replicated. Teacher fine-tuning is a
stage without a teacher; KD-QAT is a stage with one, whose steps may be split into phases (Teacher
Intervention, then plain KD-QAT) by a schedule.

Step accounting: a *micro batch* is what one rank processes in one forward; ``gradient_accumulation_steps``
micro batches make one optimizer *step*. The loop's whole position is the global micro-batch counter, so a
checkpoint at step s resumes with the same data order, RNG, optimizer and scheduler state as if it had not
stopped (see :mod:`ds_kdqat.training.order` and :mod:`ds_kdqat.training.checkpoint`).
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .config import RunConfig, ScheduleConfig
from .data.metrics import compute_metrics
from .data.tasks import TaskSpec
from .models.taps import EncoderTaps, forward_with_taps
from .quant import after_optimizer_step, lat_state, load_lat_state
from .training import checkpoint
from .training.distributed import DistInfo
from .training.logger import RunLog
from .training.optim import build_optimizer, linear_warmup_decay, parameter_groups
from .training.order import epoch_micro_batches, micro_batches_per_epoch


class Objective(Protocol):
    """What a stage minimises; the taps each forward records are the :class:`Phase`'s business."""

    def __call__(self, student: EncoderTaps, teacher: Optional[EncoderTaps], labels: torch.Tensor):
        """Return ``(loss, terms)``: the scalar to minimise and each logged term (detached)."""


@dataclass
class Phase:
    """A stretch of a stage's steps ``[start, end)``: its objective, what each forward records, and the
    teacher interventions of the phase.

    ``record``/``record_layers``: tap names and layers the student forward records (None = all layers);
    ``teacher_record``/``teacher_layers``: the same for the teacher forward (the objective's taps plus what
    the interventions are built from); ``interventions(teacher_taps)`` returns what replaces the student's
    tensors in this phase, or None.
    """

    name: str
    start: int
    end: int
    objective: Objective
    record: frozenset = frozenset()
    record_layers: Optional[tuple] = None
    teacher_record: frozenset = frozenset()
    teacher_layers: Optional[tuple] = None
    interventions: Optional[Callable[[EncoderTaps], Any]] = None


class SupervisedObjective:
    """Cross-entropy (classification) or MSE (regression) against the gold labels; used to fine-tune."""

    def __init__(self, regression: bool):
        self.regression = regression

    def __call__(self, student: EncoderTaps, teacher: Optional[EncoderTaps], labels: torch.Tensor):
        from .distill.losses import ground_truth_cross_entropy, ground_truth_mse

        loss = (ground_truth_mse if self.regression else ground_truth_cross_entropy)(student.logits, labels)
        return loss, {"ground_truth": loss.detach(), "total": loss.detach()}


def total_steps(schedule: ScheduleConfig, num_examples: int, micro_batch: int, world: int, accumulation: int,
                multiplier: float = 1.0) -> int:
    """Optimizer steps of a schedule: ⌈multiplier · epochs · micro-batches-per-epoch / accumulation⌉,
    capped by ``max_steps`` (the cap applies to the whole, budget included)."""
    per_epoch = micro_batches_per_epoch(num_examples, micro_batch, world)
    if per_epoch == 0:
        raise ValueError(
            f"{num_examples} training examples are fewer than one global batch "
            f"({micro_batch} per rank × {world} ranks)")
    steps = math.ceil(multiplier * schedule.epochs * per_epoch / accumulation)
    return min(steps, schedule.max_steps) if schedule.max_steps else steps


class _StopRequested:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the end of the current step and exits.

    So does the disappearance of the launcher above this rank (``deepspeed`` runner SIGTERMed): see
    :mod:`ds_kdqat.training.watchdog`.
    """

    def __init__(self):
        self.flag = False
        self._previous = {}
        self._unwatch = None

    def __enter__(self):
        from .training.watchdog import on_launcher_gone

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass
        self._unwatch = on_launcher_gone(self._request)
        return self

    def _handle(self, signum, frame):
        self.flag = True

    def _request(self):
        self.flag = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._unwatch is not None:
            self._unwatch()

    def agreed(self) -> bool:
        """True on every rank when any rank was asked to stop (a collective)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self.flag
        flag = torch.tensor([1.0 if self.flag else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


class StopTraining(SystemExit):
    """Raised after a checkpoint was written because a stop signal arrived; exit status 143."""

    def __init__(self):
        super().__init__(143)


def kd_phases(config, base_steps: int, num_layers: int, task_type: str) -> tuple[list[Phase], list[tuple[int, int]]]:
    """The KD-QAT stage's phases from the distillation config (Teacher Intervention, then KD-QAT) and the
    learning-rate segments: the TI step and the KD step each get their own warm-up and decay, as two
    trainings do in the Teacher Intervention paper."""
    from .distill import build_objective
    from .distill.schedule import build_interventions, plan_training, teacher_record

    objective = build_objective(config, num_layers, task_type)
    plan = plan_training(config, base_steps)
    intervene = config.ti.layers.resolve(num_layers) if config.is_teacher_intervention else ()
    phases = []
    for span in plan.phases:
        names, layers = teacher_record(objective.required_taps, objective.record_layers, span.phase, intervene)

        def build(taps, phase=span.phase):
            return build_interventions(phase, taps, intervene)

        phases.append(Phase(span.phase, span.start, span.end, objective, record=objective.required_taps,
                            record_layers=objective.record_layers, teacher_record=names, teacher_layers=layers,
                            interventions=build if span.phase != "kd" else None))
    kd_start = next((p.start for p in phases if p.name == "kd"), plan.total_steps)
    segments = [(0, kd_start), (kd_start, plan.total_steps)] if 0 < kd_start < plan.total_steps else None
    return phases, segments


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


@dataclass
class StageResult:
    best_metrics: dict = field(default_factory=dict)
    last_metrics: dict = field(default_factory=dict)
    steps: int = 0


class TeacherStudentEngine:
    """Builds the DeepSpeed engine(s) of one stage and runs its loop. See the module docstring."""

    def __init__(self, run: RunConfig, dist_info: DistInfo, student: nn.Module, teacher: Optional[nn.Module],
                 schedule: ScheduleConfig, steps: int, spec: TaskSpec, log: RunLog, stage: str,
                 segments: Optional[list[tuple[int, int]]] = None):
        import deepspeed

        self.run, self.dist, self.spec, self.log, self.stage = run, dist_info, spec, log, stage
        self.steps = steps
        groups = parameter_groups(student, schedule.weight_decay)
        optimizer = build_optimizer(schedule.optimizer, groups, schedule.learning_rate, schedule.adam_betas,
                                    schedule.adam_eps)
        scheduler = linear_warmup_decay(optimizer, steps, schedule.warmup_proportion, segments)
        ds_config = dict(run.deepspeed)
        # BertAdam is element-wise like Adam, so ZeRO's flat partitions update it exactly; DeepSpeed only
        # knows its own list of optimizers and asks for this flag for any other.
        ds_config.setdefault("zero_allow_untested_optimizer", True)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=student, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self.teacher = self._prepare_teacher(teacher) if teacher is not None else None

    # -- teacher ---------------------------------------------------------------------------------------
    def _prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        import deepspeed

        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        if self.run.zero_stage == 3 and self.run.kdqat.model.partition_teacher:
            config = {k: v for k, v in self.run.deepspeed.items()
                      if k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "fp16", "bf16",
                               "zero_optimization")}
            engine, *_ = deepspeed.initialize(model=teacher, config=config)
            engine.eval()
            return engine
        return teacher.to(self.engine.device)

    @property
    def teacher_partitioned(self) -> bool:
        """True when the teacher's parameters are sharded across ranks (ZeRO-3 with partition_teacher)."""
        if self.teacher is None:
            return False
        return any(hasattr(p, "ds_id") for p in self.teacher.parameters())

    # -- one step ----------------------------------------------------------------------------------------
    def micro_step(self, batch: dict, phase: Phase) -> dict[str, float]:
        """Forward both models on one micro batch, backward the student, and let DeepSpeed step at
        accumulation boundaries. Returns the logged terms of this micro batch."""
        batch = _to_device(batch, self.engine.device)
        inputs, labels = _model_inputs(batch), batch["labels"]
        teacher_taps = None
        interventions = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_taps = forward_with_taps(self.teacher, inputs, record=phase.teacher_record,
                                                 layers=phase.teacher_layers)
            if phase.interventions is not None:
                interventions = phase.interventions(teacher_taps)
        student_taps = forward_with_taps(self.engine, inputs, record=phase.record, layers=phase.record_layers,
                                         interventions=interventions)
        loss, terms = phase.objective(student_taps, teacher_taps, labels)
        # The teacher's taps (no graph) and the references to the student's are not needed for backward:
        # dropping them here frees the teacher's tensors before the backward pass peaks.
        del student_taps, teacher_taps, interventions
        self.engine.backward(loss)
        self.engine.step()
        return {name: float(value) for name, value in terms.items()}

    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Average logged terms over ranks (collective), so the log describes the global batch."""
        if self.dist.world_size == 1:
            return values
        keys = sorted(values)
        tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(tensor)
        return {k: float(v) / self.dist.world_size for k, v in zip(keys, tensor.tolist())}

    # -- evaluation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, dataset: Sequence[dict], model: Optional[nn.Module] = None) -> dict[str, float]:
        """Task metrics of ``model`` (default: the student) on ``dataset`` (encoded examples).

        Batches are dealt round-robin to ranks (every rank runs the same number of forwards, as ZeRO-3
        needs) and the predictions gathered, so the result is the same on every rank.
        """
        model = model if model is not None else self.engine
        was_training = model.training
        model.eval()
        size = self.run.micro_batch_size
        batches = [list(range(i, min(i + size, len(dataset)))) for i in range(0, len(dataset), size)]
        world, rank = self.dist.world_size, self.dist.rank
        rounds = math.ceil(len(batches) / world)
        mine: list[tuple[int, Any]] = []
        for r in range(rounds):
            index = r * world + rank
            real = index < len(batches)
            chunk = batches[index] if real else batches[-1]
            batch = _to_device(dataset.collate_fn([dataset[i] for i in chunk]), self._device_of(model))
            logits = model(**_model_inputs(batch)).logits.float()
            preds = logits.squeeze(-1) if self.spec.is_regression else logits.argmax(-1)
            if real:
                mine.extend(zip(chunk, preds.cpu().tolist()))
        if world > 1:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, mine)
            mine = [item for part in gathered for item in part]
        mine.sort(key=lambda item: item[0])
        predictions = [p for _, p in mine]
        labels = [dataset[i]["labels"].item() for i, _ in mine]
        if was_training:
            model.train()
        return compute_metrics(self.spec, predictions, labels)

    def _device_of(self, model: nn.Module):
        return getattr(model, "device", None) or next(model.parameters()).device

    # -- the loop ----------------------------------------------------------------------------------------
    def train(self, train_set: Sequence[dict], dev_set: Sequence[dict], phases: list[Phase], ckpt_dir: str,
              on_best: Callable[[dict], None]) -> StageResult:
        """Run (or resume) the stage to ``self.steps`` optimizer steps.

        ``on_best(metrics)`` is called (collectively) whenever the dev primary metric improves, so the
        caller can save the best student.
        """
        run, info = self.run, self.dist
        micro, accumulation = run.micro_batch_size, run.gradient_accumulation_steps
        per_epoch = micro_batches_per_epoch(len(train_set), micro, info.world_size)
        logging = run.kdqat.logging
        eval_every = logging.eval_every or max(1, per_epoch // accumulation)
        primary = self.spec.primary_metric

        state, tensors = checkpoint.load(self.engine, ckpt_dir, info.rank)
        state = state or {"micro": 0, "best": None, "best_metrics": {}, "last_metrics": {}}
        if tensors:
            load_lat_state(self.engine.module, tensors)
        # Rows of this stage past the restored step (all of them on a fresh start) are logged again.
        self.log.truncate((self.stage,), state["micro"] // accumulation)
        micro_done = state["micro"]
        step = micro_done // accumulation
        total_micro = self.steps * accumulation

        progress = None
        if info.is_main and logging.progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=self.steps, initial=step, desc=self.stage, dynamic_ncols=True)
        # The running means of the current log window are part of the state, so that a run resumed in the
        # middle of a window logs the same numbers as one that did not stop.
        window = state.get("window", {"sums": {}, "count": 0})
        sums, count = dict(window["sums"]), window["count"]
        started = time.time()
        self.engine.train()
        with _StopRequested() as stop:
            while micro_done < total_micro:
                epoch, index = divmod(micro_done, per_epoch)
                for ids in epoch_micro_batches(len(train_set), micro, info.rank, info.world_size,
                                               run.kdqat.seed, epoch, start=index):
                    phase = next(p for p in phases if p.start <= step < p.end)
                    terms = self.micro_step(train_set.collate_fn([train_set[i] for i in ids]), phase)
                    for key, value in terms.items():
                        sums[key] = sums.get(key, 0.0) + value
                    count += 1
                    micro_done += 1
                    if micro_done % accumulation:
                        continue
                    if self.engine.was_step_applied():
                        after_optimizer_step(self.engine.module)  # LAT second moments (no-op without LAT)
                    step += 1
                    if progress is not None:
                        progress.update(1)
                        progress.set_postfix(loss=f"{terms['total']:.4f}", phase=phase.name)
                    if step % logging.log_every == 0 or step == self.steps:
                        means = self._mean_over_ranks({k: v / count for k, v in sums.items()})
                        means["lr"] = self.scheduler.get_last_lr()[0]
                        means["seconds"] = time.time() - started
                        self.log.write(step, f"{self.stage}:{phase.name}", "train", means)
                        sums, count = {}, 0
                    if step % eval_every == 0 or step == self.steps:
                        metrics = self.evaluate(dev_set)
                        state["last_metrics"] = metrics
                        self.log.write(step, f"{self.stage}:{phase.name}", "dev", metrics)
                        if state["best"] is None or metrics[primary] > state["best"]:
                            state["best"], state["best_metrics"] = metrics[primary], metrics
                            on_best(metrics)
                    stopping = stop.agreed()
                    if step % logging.save_every == 0 or step == self.steps or stopping:
                        state["micro"] = micro_done
                        state["window"] = {"sums": sums, "count": count}
                        checkpoint.save(self.engine, ckpt_dir, step, state, info.rank, logging.keep_checkpoints,
                                        lat_state(self.engine.module))
                    if stopping:
                        if progress is not None:
                            progress.close()
                        raise StopTraining()
                    if micro_done >= total_micro:
                        break
        if progress is not None:
            progress.close()
        return StageResult(best_metrics=state["best_metrics"],
                           last_metrics=state["last_metrics"], steps=step)
