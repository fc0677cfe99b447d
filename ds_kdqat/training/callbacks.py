"""What the training loop does around its steps, one small callback per job.

The loop (:func:`ds_kdqat.training.loop.run_loop`) only iterates micro batches and runs the step; at each micro
batch's end and each optimizer step's end it calls every callback, in list order, with the shared
:class:`LoopState`. A callback with state that a resumed run needs (the log window's running sums, the best
dev metric) gives it through ``state_dict`` and takes it back through ``load_state_dict``; :class:`Checkpoint`
writes those parts, with the loop's micro-batch counter, to ``kdqat_state.json``::

    {"micro": int, "window": {"sums": {term: float}, "count": int},
     "best": float | None, "best_metrics": {metric: float}, "last_metrics": {metric: float},
     "ti_convergence": {"ended": {phase: step}, "criterion": {"phase": str | None, "steps": int,
                                                             "losses": [float]}}}   (with ti.convergence only)

The engine's order: :class:`QuantizedWeightsPerStep`, :class:`LatFold`, :class:`EarlyPhaseEnd` (with
``ti.convergence``), :class:`ProgressBar`
(main rank, when asked for), :class:`LogWindow`, :class:`DevEvaluation`, :class:`StopOnSignal`,
:class:`Checkpoint`.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from ..distill.schedule import PlateauCriterion, is_ti_phase
from ..quant import after_optimizer_step, clear_quant_caches, lat_state, load_lat_state, reuse_quantized_weights
from ..quant.lat import prepare_lat
from . import checkpoint


@dataclass
class LoopState:
    """Where the loop is, as the callbacks see it.

    ``micro``: micro batches done (the loop's whole position); ``step``: optimizer steps done;
    ``total_steps``: the stage's optimizer steps; ``phase``/``terms``: the phase and the logged terms (this
    rank's floats) of the last micro batch; ``stopping``: set by a callback at a step's end to end the loop
    after that step's callbacks.
    """

    micro: int
    step: int
    total_steps: int
    phase: Any = None
    terms: dict[str, float] = field(default_factory=dict)
    stopping: bool = False

    @property
    def last_step(self) -> bool:
        """True at the end of the stage's last optimizer step."""
        return self.step == self.total_steps

    def due(self, every: int) -> bool:
        """True at every ``every``-th step's end and at the last step's."""
        return self.step % every == 0 or self.last_step


class Callback:
    """A hook of the loop; every method is optional."""

    def on_train_begin(self, state: LoopState) -> None:
        """Before the first micro batch (also when there is none left)."""

    def on_micro_end(self, state: LoopState) -> None:
        """After each micro batch's step; ``state.micro`` counts it."""

    def on_step_end(self, state: LoopState) -> None:
        """After each optimizer step (every ``gradient_accumulation_steps`` micro batches)."""

    def on_train_end(self, state: LoopState) -> None:
        """When the loop ends, however it ends (finished, stopping, or an error)."""

    def state_dict(self) -> dict:
        """This callback's part of the checkpointed loop state (keys of ``kdqat_state.json``)."""
        return {}

    def load_state_dict(self, saved: dict) -> None:
        """Take back :meth:`state_dict`'s part from a checkpoint's loop state."""


class LatFold(Callback):
    """After each applied optimizer step, update the LAT quantizers' second moments from the engine's optimizer
    (``kdqat.quant.lat.second_moment: "optimizer"``, read under ZeRO 1-3 by a collective) or their own estimates
    (no-op without LAT; see :mod:`ds_kdqat.quant.lat`). Before the loop, with an optimizer state restored from
    a checkpoint, it settles where each quantizer's second moment comes from."""

    def __init__(self, engine):
        self.engine = engine

    def on_train_begin(self, state: LoopState) -> None:
        prepare_lat(self.engine.module, self.engine.optimizer)

    def on_step_end(self, state: LoopState) -> None:
        if self.engine.was_step_applied():
            after_optimizer_step(self.engine.module, optimizer=self.engine.optimizer)


class QuantizedWeightsPerStep(Callback):
    """Quantize each weight once per optimizer step, not once per micro batch: while the loop runs, the
    quantized linears keep their weights' codes between micro batches
    (:func:`ds_kdqat.quant.reuse_quantized_weights`), dropped after every optimizer step (the latent weights
    changed). Without gradient accumulation nothing is kept longer than before: the codes are saved for that
    step's backward anyway."""

    def __init__(self, module):
        self.module = module

    def on_train_begin(self, state: LoopState) -> None:
        reuse_quantized_weights(self.module, True)

    def on_step_end(self, state: LoopState) -> None:
        clear_quant_caches(self.module)

    def on_train_end(self, state: LoopState) -> None:
        reuse_quantized_weights(self.module, False)


class ProgressBar(Callback):
    """A tqdm bar of optimizer steps with the last micro batch's loss and the phase."""

    def __init__(self, desc: str):
        self.desc = desc
        self.bar = None

    def on_train_begin(self, state: LoopState) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.total_steps, initial=state.step, desc=self.desc, dynamic_ncols=True)

    def on_step_end(self, state: LoopState) -> None:
        if self.bar.total != state.total_steps:  # a TI phase ended early and the run got shorter
            self.bar.total = state.total_steps
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{state.terms['total']:.4f}", phase=state.phase.name)

    def on_train_end(self, state: LoopState) -> None:
        if self.bar is not None:
            self.bar.close()


def mean_over_ranks(values: dict[str, float], world_size: int) -> dict[str, float]:
    """Average logged terms over ranks (a collective when ``world_size`` > 1), so that the log describes the
    global batch."""
    if world_size == 1:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(tensor)
    return {k: float(v) / world_size for k, v in zip(keys, tensor.tolist())}


def window_means(sums: dict[str, float], count: int) -> dict[str, float]:
    """The running means of a log window: each term's sum over ``count`` micro batches."""
    return {k: v / count for k, v in sums.items()}


class LogWindow(Callback):
    """Sums each micro batch's terms; every ``every`` steps (and at the last) logs their means over the
    window and over ranks, with the learning rate and the seconds since the loop began, as a ``train`` row.

    The window's sums and count are checkpointed, so that a run resumed in the middle of a window logs the
    same numbers as one that did not stop.
    """

    def __init__(self, log, stage: str, every: int, world_size: int, learning_rate: Callable[[], float]):
        self.log, self.stage, self.every, self.world_size = log, stage, every, world_size
        self.learning_rate = learning_rate
        self.sums: dict[str, float] = {}
        self.count = 0
        self.started = time.time()

    def on_train_begin(self, state: LoopState) -> None:
        self.started = time.time()

    def on_micro_end(self, state: LoopState) -> None:
        for key, value in state.terms.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def on_step_end(self, state: LoopState) -> None:
        if not state.due(self.every):
            return
        means = mean_over_ranks(window_means(self.sums, self.count), self.world_size)
        means["lr"] = self.learning_rate()
        means["seconds"] = time.time() - self.started
        self.log.write(state.step, f"{self.stage}:{state.phase.name}", "train", means)
        self.sums, self.count = {}, 0

    def state_dict(self) -> dict:
        return {"window": {"sums": self.sums, "count": self.count}}

    def load_state_dict(self, saved: dict) -> None:
        window = saved.get("window", {"sums": {}, "count": 0})
        self.sums, self.count = dict(window["sums"]), window["count"]


class EarlyPhaseEnd(Callback):
    """Ends a Teacher-Intervention phase early when its loss plateaus (``kdqat.distill.ti.convergence``).

    Each TI step's loss is the mean ``total`` over its micro batches and over ranks (a collective at the end of
    each TI step, so every rank feeds the same number to the same :class:`~ds_kdqat.distill.schedule.PlateauCriterion`).
    When the criterion fires before the phase's end, ``phases`` (a :class:`~ds_kdqat.distill.phases.KdPhases`)
    ends the phase at this step and ``on_replan(state)`` lets the engine follow the new plan (total steps and
    learning-rate segments). Where phases ended and the criterion's window are checkpointed.
    """

    def __init__(self, phases, world_size: int, on_replan: Callable[[LoopState], None]):
        self.phases, self.world_size, self.on_replan = phases, world_size, on_replan
        self.criterion = PlateauCriterion(phases.convergence)
        self.sum, self.count = 0.0, 0

    def on_micro_end(self, state: LoopState) -> None:
        if is_ti_phase(state.phase.name):
            self.sum += state.terms["total"]
            self.count += 1

    def on_step_end(self, state: LoopState) -> None:
        phase = state.phase
        if not is_ti_phase(phase.name):
            return
        loss = mean_over_ranks({"total": self.sum / max(self.count, 1)}, self.world_size)["total"]
        self.sum, self.count = 0.0, 0
        if self.criterion.update(phase.name, loss) and state.step < phase.end:
            self.phases.end_early(phase.name, state.step)
            self.on_replan(state)

    def state_dict(self) -> dict:
        return {"ti_convergence": {**self.phases.state_dict(), "criterion": self.criterion.state_dict()}}

    def load_state_dict(self, saved: dict) -> None:
        part = saved.get("ti_convergence")
        if part is not None:
            self.phases.load_state_dict(part)
            self.criterion.load_state_dict(part["criterion"])


class DevEvaluation(Callback):
    """Every ``every`` steps (and at the last) evaluates on the dev set, logs a ``dev`` row, and calls
    ``on_best(metrics)`` (on every rank) when the ``primary`` metric beats the best so far."""

    def __init__(self, evaluate: Callable[[], dict], log, stage: str, every: int, primary: str,
                 on_best: Callable[[dict], None]):
        self.evaluate, self.log, self.stage, self.every, self.primary = evaluate, log, stage, every, primary
        self.on_best = on_best
        self.best: Optional[float] = None
        self.best_metrics: dict = {}
        self.last_metrics: dict = {}

    def on_step_end(self, state: LoopState) -> None:
        if not state.due(self.every):
            return
        metrics = self.evaluate()
        self.last_metrics = metrics
        self.log.write(state.step, f"{self.stage}:{state.phase.name}", "dev", metrics)
        if self.best is None or metrics[self.primary] > self.best:
            self.best, self.best_metrics = metrics[self.primary], metrics
            self.on_best(metrics)

    def state_dict(self) -> dict:
        return {"best": self.best, "best_metrics": self.best_metrics, "last_metrics": self.last_metrics}

    def load_state_dict(self, saved: dict) -> None:
        self.best, self.best_metrics, self.last_metrics = saved["best"], saved["best_metrics"], saved["last_metrics"]


class StopTraining(SystemExit):
    """Raised after a checkpoint was written because a stop signal arrived; exit status 143."""

    def __init__(self):
        super().__init__(143)


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
        from .watchdog import on_launcher_gone

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


class StopOnSignal(Callback):
    """While the loop runs, a stop signal (or the launcher's disappearance) on any rank sets
    ``state.stopping`` at the next step's end, on every rank (a collective each step)."""

    def __init__(self):
        self.requests = _StopRequested()

    def on_train_begin(self, state: LoopState) -> None:
        self.requests.__enter__()

    def on_step_end(self, state: LoopState) -> None:
        state.stopping = self.requests.agreed()

    def on_train_end(self, state: LoopState) -> None:
        self.requests.__exit__(None, None, None)


class Checkpoint(Callback):
    """Saves the engine, the RNG, the LAT second moments and the loop state every ``every`` steps, at the
    last step and when stopping (a collective); :meth:`restore` loads the newest good checkpoint.

    ``parts``: the callbacks whose :meth:`~Callback.state_dict` goes into the loop state.
    """

    def __init__(self, engine, folder: str, rank: int, every: int, keep: int, parts: Sequence[Callback] = ()):
        self.engine, self.folder, self.rank, self.every, self.keep = engine, folder, rank, every, keep
        self.parts = tuple(parts)
        self.restored: dict = {}

    def restore(self) -> int:
        """Collective. Load the newest good checkpoint into the engine, the RNG, the LAT quantizers and the
        parts; return its micro-batch counter (0, and nothing loaded, when there is none)."""
        saved, tensors = checkpoint.load(self.engine, self.folder, self.rank)
        if saved is None:
            return 0
        if tensors:
            load_lat_state(self.engine.module, tensors)
        for part in self.parts:
            part.load_state_dict(saved)
        self.restored = saved
        return saved["micro"]

    def loop_state(self, state: LoopState) -> dict:
        """What ``kdqat_state.json`` holds at ``state`` (keys of the restored state that no part owns are
        carried over)."""
        record = {**self.restored, "micro": state.micro}
        for part in self.parts:
            record.update(part.state_dict())
        return record

    def on_step_end(self, state: LoopState) -> None:
        if state.due(self.every) or state.stopping:
            checkpoint.save(self.engine, self.folder, state.step, self.loop_state(state), self.rank, self.keep,
                            lat_state(self.engine.module))
