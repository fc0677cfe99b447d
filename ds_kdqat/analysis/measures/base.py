"""The shape of one analysis metric: a ``compute`` accumulator fed batch by batch, and a ``write`` function.

A metric is a :class:`Metric` in the plain dict :data:`ds_kdqat.analysis.measures.METRICS`:

* ``compute(setup) -> accumulator``; ``accumulator.add(step)`` for each :class:`Step` (one batch run
  through every model, under ``torch.no_grad``), then ``accumulator.finish(result)`` fills its fields of
  the :class:`~ds_kdqat.analysis.result.AnalysisResult`;
* ``write(result, report)`` writes its files through :class:`Report` and adds its part of ``metrics.json``;
* ``enabled(config)`` says whether ``analyze`` runs it (writers always run and skip what has no data).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from ..config import AnalysisConfig
from ..io import save_figure, write_csv
from ..result import AnalysisResult


@dataclass
class Setup:
    """What every metric of one ``analyze`` call shares. ``compared``: the model names other than
    ``"teacher"``, in ``models`` order; ``special_token_id``: None skips the special-token distances."""

    config: AnalysisConfig
    models: Mapping[str, nn.Module]
    special_token_id: Optional[int]
    id_to_token: Optional[Callable[[list[int]], list[str]]]
    device: torch.device

    @property
    def compared(self) -> list[str]:
        return [name for name in self.models if name != "teacher"]


@dataclass
class Step:
    """One batch of B examples (S positions) run through every model (L layers, H heads).

    ``batch``: the model inputs on the device, ``attention_mask`` (B, S) always present (= ``mask``);
    ``special``: (B, S) bool, tokens equal to the special token, or None; ``taps[name]``: that model's
    :class:`~ds_kdqat.models.taps.EncoderTaps` (attention maps, attention outputs, layer outputs, logits);
    ``first``: index in the split of the batch's first example.
    """

    batch: dict[str, torch.Tensor]
    mask: torch.Tensor
    special: Optional[torch.Tensor]
    taps: dict[str, Any]
    first: int
    size: int
    layers: int
    heads: int


class Accumulator(Protocol):
    def add(self, step: Step) -> None: ...

    def finish(self, result: AnalysisResult) -> None: ...


@dataclass
class Report:
    """Where metrics write: files under ``out`` (each recorded in ``written``, name → path) and their parts
    of ``summary`` (the ``metrics.json`` being assembled; per compared model under ``summary["models"]``)."""

    out: Path
    range_layers: Sequence[int]
    summary: dict
    written: dict[str, Path] = field(default_factory=dict)

    def csv(self, name: str, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
        self.written[name] = write_csv(self.out / name, columns, rows)

    def png(self, name: str, figure) -> None:
        self.written[name] = save_figure(figure, self.out / name)

    def model_summary(self, model: str) -> dict:
        """The ``metrics.json`` entry of ``model`` (created on first use)."""
        return self.summary["models"].setdefault(model, {})


def _always(config: AnalysisConfig) -> bool:
    return True


class Metric(NamedTuple):
    compute: Callable[[Setup], Accumulator]
    write: Callable[[AnalysisResult, Report], None]
    enabled: Callable[[AnalysisConfig], bool] = _always


class RunningMeans:
    """Per key, running sums of equally shaped ``total`` and ``count`` tensors over batches (float64, CPU);
    ``mean(key) = Σ total / Σ count`` — a mean over a whole split from per-batch sums."""

    def __init__(self):
        self.total: dict[tuple, torch.Tensor] = {}
        self.count: dict[tuple, torch.Tensor] = {}

    def add(self, key: tuple, total: torch.Tensor, count: torch.Tensor) -> None:
        total, count = total.detach().double().cpu(), count.detach().double().cpu()
        self.total[key] = total if key not in self.total else self.total[key] + total
        self.count[key] = count if key not in self.count else self.count[key] + count

    def mean(self, key: tuple) -> np.ndarray:
        return (self.total[key] / self.count[key]).numpy()

    def per_layer(self, key: tuple, layers: int) -> np.ndarray:
        """``mean(key + (l,))`` stacked over ``l < layers`` → (L, …)."""
        return np.stack([self.mean((*key, layer)) for layer in range(layers)])


def finite_or_none(value) -> Optional[float]:
    """``float(value)``, or None for NaN (an empty CSV cell, JSON null)."""
    value = float(value)
    return None if np.isnan(value) else value
