"""Teacher–student training on a DeepSpeed engine: one stage of optimisation, resumable at the exact step.

A *stage* trains one model (the student) under ``deepspeed.initialize`` (ZeRO 0–3, fp32/bf16/fp16 as the
ds_config says, ZeRO-Offload of the optimizer state and of ZeRO-3's parameters) against an *objective*; the
teacher, when there is one, is frozen, in eval mode and run without gradients, in
``kdqat.model.teacher_precision`` (:mod:`ds_kdqat.training.teacher`) — under ZeRO-3 with
``kdqat.model.partition_teacher`` it gets an engine of its own so its parameters are partitioned across ranks
like the student's instead of replicated. Teacher fine-tuning is a stage without a teacher; KD-QAT is a stage
with one, whose steps may be split into phases (Teacher Intervention, then plain KD-QAT) by a schedule.

With ``zero_optimization.offload_optimizer`` the optimizer is DeepSpeed's ``DeepSpeedCPUAdam`` computing the
configured BertAdam / AdamW update (:func:`ds_kdqat.training.optim.build_optimizer`); its state keeps
``exp_avg_sq``, so LAT's ``second_moment: "optimizer"`` reads it as usual (:mod:`ds_kdqat.quant.lat`).

Step accounting: a *micro batch* is what one rank processes in one forward; ``gradient_accumulation_steps``
micro batches make one optimizer *step*. The loop's whole position is the global micro-batch counter, so a
checkpoint at step s resumes with the same data order, RNG, optimizer and scheduler state as if it had not
stopped (see :mod:`ds_kdqat.training.order` and :mod:`ds_kdqat.training.checkpoint`).

The loop itself (:func:`ds_kdqat.training.loop.run_loop`) only iterates micro batches and runs the step;
logging, evaluation, the LAT update, the early end of a Teacher-Intervention phase, checkpoints and stopping are
callbacks (:mod:`ds_kdqat.training.callbacks`). The step's forward half is
:func:`ds_kdqat.distill.step.kd_forward`; the phases are :mod:`ds_kdqat.distill.phases`.

Gradient guard: on the first micro batch of each phase (in this process) the main rank checks which trainable
student parameters that batch's loss can reach (:mod:`ds_kdqat.distill.gradients`: a walk of the autograd graph,
nothing computed, so training is unchanged) and warns once, naming the parameters that get no gradient in the
phase and that the phase does not leave untrained on purpose (those are reported at INFO level). It works under
every ZeRO stage (partitioned parameters are still the graph's leaves) and under ``activation_checkpointing``
(non-reentrant: the whole graph is built in the forward); when the graph reaches no parameter at all (or under
reentrant checkpointing set up by hand) it cannot tell and is skipped with a DEBUG note.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .config import RunConfig, ScheduleConfig
from .data.metrics import compute_metrics
from .data.tasks import TaskSpec
from .distill.gradients import compact_names, graph_check_possible, phase_gradient_report
from .distill.phases import Phase
from .distill.step import kd_forward, model_inputs
from .errors import ConfigError
from .models.checkpointing import enable_activation_checkpointing
from .models.taps import output_logits
from .training.callbacks import (Checkpoint, DevEvaluation, EarlyPhaseEnd, LatFold, LogWindow, LoopState,
                                 ProgressBar, QuantizedWeightsPerStep, StopOnSignal, StopTraining)
from .training.distributed import DistInfo
from .training.loop import ordered_micro_batches, run_loop
from .training.logger import RunLog
from .training.optim import build_optimizer, linear_warmup_decay, parameter_groups
from .training.order import micro_batches_per_epoch
from .training.teacher import check_teacher_precision, convert_teacher, teacher_engine_config
from .training.zero import is_partitioned

__all__ = ["NoGradientWarning", "StageResult", "StopTraining", "TeacherStudentEngine", "steps_per_epoch",
           "total_steps"]

logger = logging.getLogger(__name__)


class NoGradientWarning(UserWarning):
    """Trainable student parameters get no gradient in a phase (and the phase does not mean them to)."""


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


def steps_per_epoch(num_examples: int, micro_batch: int, world: int, accumulation: int) -> int:
    """Whole optimizer steps in one epoch of the training data (at least 1): the unit of ``ti.max_epochs``."""
    return max(1, micro_batches_per_epoch(num_examples, micro_batch, world) // accumulation)


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _enable_checkpointing(model: nn.Module, section: str) -> int:
    """``<section>.activation_checkpointing``: checkpoint ``model``'s encoder layers (ds_kdqat.models.checkpointing);
    returns their number."""
    try:
        return enable_activation_checkpointing(model)
    except ValueError as error:
        raise ConfigError(f"{section}.activation_checkpointing", str(error)) from None


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
        self.schedule = schedule
        self._gradient_checked: set[str] = set()
        if teacher is not None:
            from deepspeed.accelerator import get_accelerator

            check_teacher_precision(run.kdqat.model.teacher_precision, get_accelerator().device_name(),
                                    run.teacher_partitioned)
        if schedule.activation_checkpointing:
            section = "kdqat.finetune" if teacher is None else "kdqat.train"
            layers = _enable_checkpointing(student, section)
            if dist_info.is_main:
                print(f"ds-kdqat: {section}.activation_checkpointing: {layers} encoder layers checkpointed")
        groups = parameter_groups(student, schedule.weight_decay)
        optimizer = build_optimizer(schedule.optimizer, groups, schedule.learning_rate, schedule.adam_betas,
                                    schedule.adam_eps, bertadam_max_grad_norm=schedule.bertadam_max_grad_norm,
                                    cpu_offload=run.offload_optimizer)
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
        """The frozen teacher in ``kdqat.model.teacher_precision``: partitioned by an engine of its own (ZeRO-3
        with ``partition_teacher``; bf16 only when that precision asks for it) or replicated on this rank's
        device (:func:`~ds_kdqat.training.teacher.convert_teacher`)."""
        import deepspeed

        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        precision = self.run.kdqat.model.teacher_precision
        if self.run.teacher_partitioned:
            engine, *_ = deepspeed.initialize(model=convert_teacher(teacher, precision),
                                              config=teacher_engine_config(self.run.deepspeed, precision))
            engine.eval()
            return engine
        return convert_teacher(teacher, precision).to(self.engine.device)

    @property
    def teacher_partitioned(self) -> bool:
        """True when the teacher's parameters are sharded across ranks (ZeRO-3 with partition_teacher)."""
        if self.teacher is None:
            return False
        return is_partitioned(self.teacher)

    # -- one step ----------------------------------------------------------------------------------------
    def micro_step(self, batch: dict, phase: Phase) -> dict[str, float]:
        """Forward both models on one micro batch (:func:`~ds_kdqat.distill.step.kd_forward`), backward the
        student, and let DeepSpeed step at accumulation boundaries. Returns the logged terms of this micro
        batch."""
        loss, terms = kd_forward(self.teacher, self.engine, _to_device(batch, self.engine.device), phase)
        if phase.name not in self._gradient_checked:
            self._gradient_checked.add(phase.name)
            self.check_gradients(loss, phase)
        self.engine.backward(loss)
        self.engine.step()
        return {name: float(value) for name, value in terms.items()}

    def check_gradients(self, loss: torch.Tensor, phase: Phase) -> list[str]:
        """The gradient guard (module docstring) on ``loss``, one micro batch's loss of ``phase`` before its
        backward: warns (main rank) naming the trainable parameters without gradient that ``phase`` does not
        leave untrained on purpose, and returns them ([] on other ranks or when the check is not possible)."""
        if not self.dist.is_main:
            return []
        where = f"{self.stage}:{phase.name}"
        why_not = graph_check_possible(self.engine)
        if why_not is not None:
            logger.debug("%s: gradient check skipped: %s", where, why_not)
            return []
        try:
            missing, on_purpose = phase_gradient_report(loss, self.engine.module, phase)
        except ValueError as error:
            logger.debug("%s: gradient check skipped: %s", where, error)
            return []
        for why in dict.fromkeys(on_purpose.values()):
            names = [name for name, reason in on_purpose.items() if reason == why]
            logger.info("%s: %d parameter(s) not trained in this phase on purpose (%s): %s", where, len(names), why,
                        ", ".join(compact_names(names)))
        if missing:
            warnings.warn(f"{where}: {len(missing)} trainable parameter(s) receive no gradient in this phase: "
                          f"{', '.join(compact_names(missing))}. Their loss terms may be switched off (weight 0) or "
                          "cut off by a teacher intervention", NoGradientWarning, stacklevel=2)
        return missing

    # -- the learning-rate schedule of a replanned stage ------------------------------------------------
    def follow_plan(self, phases, state: Optional[LoopState] = None) -> None:
        """Take the current plan of ``phases`` (a :class:`~ds_kdqat.distill.phases.KdPhases` whose TI phase ended
        early, or restored so): its total steps (``self.steps``, ``state.total_steps``) and its learning-rate
        segments. The scheduler's factor is replaced and the current learning rate recomputed from it, so the
        next step runs at the rate of the new plan, as a resumed run does."""
        self.steps = phases.total_steps
        if state is not None:
            state.total_steps = self.steps
        dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        factor = linear_warmup_decay(dummy, self.steps, self.schedule.warmup_proportion,
                                     phases.segments).lr_lambdas[0]
        scheduler = self.scheduler
        scheduler.lr_lambdas = [factor] * len(scheduler.optimizer.param_groups)
        rates = [base * factor(scheduler.last_epoch) for base in scheduler.base_lrs]
        for group, rate in zip(scheduler.optimizer.param_groups, rates):
            group["lr"] = rate
        scheduler._last_lr = rates

    # -- evaluation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, dataset: Sequence[dict], model: Optional[nn.Module] = None, *,
                 local: bool = False) -> dict[str, float]:
        """Task metrics of ``model`` (default: the student) on ``dataset`` (encoded examples).

        Batches are dealt round-robin to ranks (every rank runs the same number of forwards, as ZeRO-3
        needs) and the predictions gathered, so the result is the same on every rank. ``local``: this rank
        alone runs every batch (no collective; for a model only one rank holds, such as the exported student).
        """
        return self.score(dataset, self.predict(dataset, model, local=local))

    def score(self, dataset: Sequence[dict], predictions: list) -> dict[str, float]:
        """Task metrics of :meth:`predict`'s ``predictions`` of ``dataset``."""
        if self.spec.is_qa:
            return dataset.score(predictions)  # SQuAD EM/F1 (ds_kdqat.data.qa_post, qa_metrics)
        labels = [dataset[i]["labels"].item() for i in range(len(dataset))]
        return compute_metrics(self.spec, predictions, labels)

    @torch.no_grad()
    def predict(self, dataset: Sequence[dict], model: Optional[nn.Module] = None, *, local: bool = False) -> list:
        """``model``'s prediction of every example of ``dataset``, in order: the class index, the regression
        score, or (QA) each feature's (len_i, 2) start/end logits. Collective unless ``local``."""
        model = model if model is not None else self.engine
        was_training = model.training
        model.eval()
        size = self.run.micro_batch_size
        batches = [list(range(i, min(i + size, len(dataset)))) for i in range(0, len(dataset), size)]
        world, rank = (1, 0) if local else (self.dist.world_size, self.dist.rank)
        rounds = math.ceil(len(batches) / world)
        mine: list[tuple[int, Any]] = []
        for r in range(rounds):
            index = r * world + rank
            real = index < len(batches)
            chunk = batches[index] if real else batches[-1]
            batch = _to_device(dataset.collate_fn([dataset[i] for i in chunk]), self._device_of(model))
            output = model(**model_inputs(batch))
            if self.spec.is_qa:  # per feature: its (len_i, 2) start/end logits, scored per question
                preds = [row[:n].numpy() for row, n in zip(output_logits(output).float().cpu(),
                                                            batch["attention_mask"].sum(-1).tolist())]
            else:
                logits = output.logits.float()
                preds = (logits.squeeze(-1) if self.spec.is_regression else logits.argmax(-1)).cpu().tolist()
            if real:
                mine.extend(zip(chunk, preds))
        if world > 1:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, mine)
            mine = [item for part in gathered for item in part]
        mine.sort(key=lambda item: item[0])
        if was_training:
            model.train()
        return [p for _, p in mine]

    def _device_of(self, model: nn.Module):
        device = getattr(model, "device", None)
        if device is not None:
            return device
        return next(iter(model.parameters()), torch.empty(0)).device

    # -- the loop ----------------------------------------------------------------------------------------
    def train(self, train_set: Sequence[dict], dev_set: Sequence[dict], phases: list[Phase], ckpt_dir: str,
              on_best: Callable[[dict], None]) -> StageResult:
        """Run (or resume) the stage to ``self.steps`` optimizer steps.

        ``on_best(metrics)`` is called (collectively) whenever the dev primary metric improves, so the
        caller can save the best student. Raises :class:`StopTraining` after checkpointing when asked to stop.
        """
        run, info, logging = self.run, self.dist, self.run.kdqat.logging
        accumulation = run.gradient_accumulation_steps
        per_epoch = micro_batches_per_epoch(len(train_set), run.micro_batch_size, info.world_size)
        window = LogWindow(self.log, self.stage, logging.log_every, info.world_size,
                           lambda: self.scheduler.get_last_lr()[0])
        dev = DevEvaluation(lambda: self.evaluate(dev_set), self.log, self.stage,
                            logging.eval_every or max(1, per_epoch // accumulation), self.spec.primary_metric,
                            on_best)
        early_end = (EarlyPhaseEnd(phases, info.world_size, lambda state: self.follow_plan(phases, state))
                     if getattr(phases, "convergence", None) is not None else None)
        saver = Checkpoint(self.engine, ckpt_dir, info.rank, logging.save_every, logging.keep_checkpoints,
                           parts=(window, dev) + ((early_end,) if early_end else ()))
        micro = saver.restore()
        if early_end is not None and phases.ended:  # a TI phase had ended early: resume in the same plan
            self.follow_plan(phases)
        ended = saver.restored.get("ti_convergence", {}).get("ended") if early_end is None else None
        if ended:
            raise ConfigError("kdqat.distill.ti.convergence.enabled", f"is off, but in the checkpoint of this stage "
                              f"({ckpt_dir}) Teacher-Intervention phases ended early ({ended}) under it; turn it "
                              "back on to resume, or delete that folder to restart the stage")
        # Rows of this stage past the restored step (all of them on a fresh start) are logged again.
        self.log.truncate((self.stage,), micro // accumulation)
        progress = [ProgressBar(self.stage)] if info.is_main and logging.progress else []
        callbacks = [QuantizedWeightsPerStep(self.engine.module), LatFold(self.engine),
                     *([early_end] if early_end else []), *progress, window, dev, StopOnSignal(), saver]
        ids = ordered_micro_batches(len(train_set), run.micro_batch_size, info.rank, info.world_size,
                                    run.kdqat.seed, micro)
        batches = (train_set.collate_fn([train_set[i] for i in chunk]) for chunk in ids)
        state = LoopState(micro=micro, step=micro // accumulation, total_steps=self.steps)
        self.engine.train()
        run_loop(batches, self.micro_step, phases, state, accumulation, callbacks)
        if state.stopping:
            raise StopTraining()
        return StageResult(best_metrics=dev.best_metrics, last_metrics=dev.last_metrics, steps=state.step)
