"""Teacher vs quantized-before-QAT vs student on one data split: every analysis metric, accumulated over batches.

This is the one place that runs models (through :func:`ds_kdqat.models.taps.forward_with_taps`); the
metrics themselves are the pure tensor functions of the sibling modules. ``models`` maps a name to a model;
``"teacher"`` is required and every other model is compared against it (usually ``"quantized"``, the
teacher converted by ``quantize_model`` without training, and ``"student"``, the model after KD-QAT).

Reductions over a split (padding excluded everywhere, see each metric's docstring):

* cover length ratio, ranking loss (per layer, head): mean over all real query rows of all examples;
* layer-wise MSE: squared error summed over real tokens and features of all examples, over their count;
* SA-GEN / SA-PROP distance (per layer, head): mean over real tokens (``all``) and over the tokens equal to
  ``special_token`` (e.g. ``[SEP]``);
* attention-output range (per layer, position): mean over the examples where the position is a real token
  of the per-token min and max of ``Y_l``;
* Hessian: top eigenvalues of the task loss (cross-entropy, or MSE for one-output regression) of the
  first ``hessian.batches`` batches, w.r.t. the model's parameters, labels from the data or, when the data
  has none, the teacher's predictions. Through the student's straight-through quantizers this is the
  Hessian that QAT's gradients see.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .attention_metrics import cover_length_ratio, pairwise_ranking_loss
from .decomposition import sa_gen_distance_sums, sa_prop_distance_sums, sa_prop_vectors
from .hessian import top_hessian_eigenvalues
from .propagation import squared_error_sums
from .ranges import position_range_sums

ModelName = Literal["teacher", "quantized", "student"]
MODEL_NAMES = ("teacher", "quantized", "student")


def _check_layers(values: Sequence[int], path: str) -> None:
    for i, value in enumerate(values):
        if value < 0:
            raise ConfigError(f"{path}[{i}]", f"got {value}; layer/head indices start at 0")


@dataclass
class HessianConfig:
    """Power iteration on Hessian-vector products (see :mod:`ds_kdqat.analysis.hessian`)."""

    enabled: bool = True
    models: list[ModelName] = field(default_factory=lambda: list(MODEL_NAMES))
    num_eigenvalues: int = 1
    max_iter: int = 50
    tol: float = 1e-3
    batches: int = 1
    params: Literal["all", "encoder"] = "all"
    seed: int = 0

    def validate(self, path: str = "analysis.hessian") -> None:
        for i, name in enumerate(self.models):
            if name not in MODEL_NAMES:
                raise ConfigError(f"{path}.models[{i}]", f"got {name!r}; allowed: {', '.join(MODEL_NAMES)}")
        for name in ("num_eigenvalues", "max_iter", "batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{path}.{name}", f"got {getattr(self, name)}; must be >= 1")
        if not self.tol > 0:
            raise ConfigError(f"{path}.tol", f"got {self.tol}; must be > 0")
        if self.params not in ("all", "encoder"):
            raise ConfigError(f"{path}.params", f"got {self.params!r}; allowed: all, encoder")


@dataclass
class AnalysisConfig:
    """What ``run/analyze.py`` computes. ``cover_top_k``: K of the cover length; ``ranking_margin``: the
    hinge margin of the ranking loss (0 as in the paper); ``max_examples``: null = the whole split;
    ``special_token``: token whose SA-GEN/SA-PROP distances are reported besides all tokens (null = none);
    ``heatmap_*``: which example, layers (empty = all) and heads get attention-map heatmaps;
    ``range_layers``: layers whose min–max curves are plotted (empty = all; the CSV has all)."""

    cover_top_k: int = 5
    ranking_margin: float = 0.0
    batch_size: int = 16
    max_examples: Optional[int] = 256
    special_token: Optional[str] = "[SEP]"
    heatmap_example: int = 0
    heatmap_layers: list[int] = field(default_factory=list)
    heatmap_heads: list[int] = field(default_factory=lambda: [0])
    range_layers: list[int] = field(default_factory=list)
    hessian: HessianConfig = field(default_factory=HessianConfig)

    def validate(self, path: str = "analysis") -> None:
        if self.cover_top_k < 1:
            raise ConfigError(f"{path}.cover_top_k", f"got {self.cover_top_k}; must be >= 1")
        if self.ranking_margin < 0:
            raise ConfigError(f"{path}.ranking_margin", f"got {self.ranking_margin}; must be >= 0")
        if self.batch_size < 1:
            raise ConfigError(f"{path}.batch_size", f"got {self.batch_size}; must be >= 1")
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError(f"{path}.max_examples", f"got {self.max_examples}; must be >= 1 or null")
        if self.special_token is not None and not self.special_token:
            raise ConfigError(f"{path}.special_token", "must be a token string or null")
        if self.heatmap_example < 0:
            raise ConfigError(f"{path}.heatmap_example", f"got {self.heatmap_example}; must be >= 0")
        _check_layers(self.heatmap_layers, f"{path}.heatmap_layers")
        _check_layers(self.heatmap_heads, f"{path}.heatmap_heads")
        _check_layers(self.range_layers, f"{path}.range_layers")
        self.hessian.validate(f"{path}.hessian")


@dataclass
class HessianSummary:
    values: list[float]
    iterations: list[int]
    converged: list[bool]
    num_params: int


@dataclass
class AnalysisResult:
    """Everything :func:`analyze` measured, as numpy arrays (L layers, H heads, S positions).

    ``heads[model][metric]`` (L, H) for ``cover_length_ratio`` / ``ranking_loss``;
    ``mse[model][kind]`` for ``layer_outputs`` (L+1,) and ``attention_outputs`` (L,);
    ``sa[model][tokens][kind]`` (L, H), tokens ``all`` or the special token, kind ``sa_gen`` / ``sa_prop``;
    ``ranges[model]`` = (min mean (L, S), max mean (L, S), count (S,));
    ``heatmaps[(layer, head)][model]`` (n, n) for the chosen example, whose tokens are ``heatmap_tokens``.
    """

    num_examples: int = 0
    num_layers: int = 0
    num_heads: int = 0
    cover_top_k: int = 0
    heads: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    mse: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    sa: dict[str, dict[str, dict[str, np.ndarray]]] = field(default_factory=dict)
    ranges: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    heatmaps: dict[tuple[int, int], dict[str, np.ndarray]] = field(default_factory=dict)
    heatmap_tokens: list[str] = field(default_factory=list)
    hessian: dict[str, HessianSummary] = field(default_factory=dict)


class _Sum:
    """Running sums and counts of equally shaped tensors, for means over a split."""

    def __init__(self):
        self.total: Optional[torch.Tensor] = None
        self.count: Optional[torch.Tensor] = None

    def add(self, total: torch.Tensor, count: torch.Tensor) -> None:
        total, count = total.detach().double().cpu(), count.detach().double().cpu()
        self.total = total if self.total is None else self.total + total
        self.count = count if self.count is None else self.count + count

    def mean(self) -> np.ndarray:
        return (self.total / self.count).numpy()


class _PositionSum:
    """Per-position sums over batches of different padded lengths (the arrays grow to the longest)."""

    def __init__(self, layers: int):
        self.low = np.zeros((layers, 0))
        self.high = np.zeros((layers, 0))
        self.count = np.zeros(0)

    def _grow(self, length: int) -> None:
        extra = length - self.count.shape[0]
        if extra > 0:
            self.low = np.pad(self.low, ((0, 0), (0, extra)))
            self.high = np.pad(self.high, ((0, 0), (0, extra)))
            self.count = np.pad(self.count, (0, extra))

    def add(self, layer: int, low: torch.Tensor, high: torch.Tensor, count: torch.Tensor, first_layer: bool) -> None:
        self._grow(low.shape[0])
        n = low.shape[0]
        self.low[layer, :n] += low.double().cpu().numpy()
        self.high[layer, :n] += high.double().cpu().numpy()
        if first_layer:
            self.count[:n] += count.double().cpu().numpy()

    def means(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.low / self.count, self.high / self.count, self.count


def _model_value_and_output(model: nn.Module, layer: int) -> tuple[nn.Module, torch.Tensor]:
    """(value projection module, effective output-projection weight (D, D)) of ``layer``."""
    from ..models.adapters import adapter_for
    from ..models.attention import self_attention_modules

    attention = self_attention_modules(model)[layer]
    value = next((getattr(attention, name) for name in ("value", "v_lin") if hasattr(attention, name)), None)
    if value is None:
        raise TypeError(f"{type(attention).__name__} has no value projection named value or v_lin")
    adapter = adapter_for(model)
    output = adapter.mha_output_module(adapter.layer_modules(model)[layer])
    weight = output.quantized_weight() if hasattr(output, "quantized_weight") else output.weight
    return value, weight


def _sa_prop(model: nn.Module, layer: int, layer_input: torch.Tensor, heads: int) -> torch.Tensor:
    """``f_h(x_j)`` of every token of ``layer`` from the model's own value projection and output weight."""
    value, weight = _model_value_and_output(model, layer)
    return sa_prop_vectors(value(layer_input), weight, heads)


def _task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.shape[-1] == 1 and labels.is_floating_point():
        return F.mse_loss(logits.squeeze(-1), labels)
    return F.cross_entropy(logits, labels.long())


def _model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if batch.get(k) is not None}


def hessian_of_model(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]], config: HessianConfig,
                     device: torch.device) -> HessianSummary:
    """Top Hessian eigenvalues of the task loss over ``batches`` (each with ``labels``)."""
    from ..models.attention import KDQAT_ATTENTION, self_attention_modules, use_kdqat_attention

    model.eval()
    # Fused SDPA kernels have no double backward; the kdqat (eager) attention has.
    if self_attention_modules(model) and getattr(model.config, "_attn_implementation", None) != KDQAT_ATTENTION:
        use_kdqat_attention(model)
    scope = model
    if config.params == "encoder":
        scope = getattr(getattr(model, "base_model", model), "encoder", None)
        if scope is None:
            raise ConfigError("analysis.hessian.params", f"{type(model).__name__} has no base_model.encoder")
    params = [p for p in scope.parameters() if p.is_floating_point()]
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)

    def closure(batch):
        def loss() -> torch.Tensor:
            return _task_loss(model(**_model_inputs(batch)).logits, batch["labels"])

        return loss

    generator = torch.Generator().manual_seed(config.seed)
    try:
        with torch.enable_grad():
            found = top_hessian_eigenvalues([closure(b) for b in batches], params, k=config.num_eigenvalues,
                                            max_iter=config.max_iter, tol=config.tol, generator=generator)
    finally:
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)
    return HessianSummary(found.values, found.iterations, found.converged, sum(p.numel() for p in params))


def analyze(
    models: Mapping[str, nn.Module],
    batches: Iterable[Mapping[str, torch.Tensor]],
    config: AnalysisConfig,
    special_token_id: Optional[int] = None,
    id_to_token: Optional[Callable[[list[int]], list[str]]] = None,
    device: Optional[torch.device] = None,
) -> AnalysisResult:
    """Run every model on ``batches`` and measure everything in the module docstring.

    ``batches``: dicts with ``input_ids`` and ``attention_mask`` (B, S), optionally ``token_type_ids`` and
    ``labels``; ``special_token_id``: the id of ``config.special_token`` (None skips the special-token
    distances); ``id_to_token`` turns the heatmap example's ids into labels for the axes.
    """
    from ..models.taps import forward_with_taps

    if "teacher" not in models:
        raise ValueError(f"models must include 'teacher'; got {sorted(models)}")
    device = device or torch.device("cpu")
    for model in models.values():
        model.to(device).eval()
    compared = [name for name in models if name != "teacher"]
    record = {"attention_maps", "attention_outputs", "layer_outputs"}
    token_sets = ["all"] + ([config.special_token] if special_token_id is not None else [])

    sums: dict[tuple, _Sum] = {}
    positions: dict[str, _PositionSum] = {}
    result = AnalysisResult(cover_top_k=config.cover_top_k)
    hessian_batches: list[dict] = []
    seen = 0

    def acc(key: tuple, total: torch.Tensor, count: torch.Tensor) -> None:
        sums.setdefault(key, _Sum()).add(total, count)

    for batch in batches:
        if config.max_examples is not None and seen >= config.max_examples:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        if config.max_examples is not None and seen + batch["input_ids"].shape[0] > config.max_examples:
            batch = {k: v[: config.max_examples - seen] for k, v in batch.items()}
        size = batch["input_ids"].shape[0]
        mask = batch.get("attention_mask")
        if mask is None:
            mask = batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        special = (batch["input_ids"] == special_token_id) if special_token_id is not None else None
        with torch.no_grad():
            taps = {name: forward_with_taps(model, batch, record) for name, model in models.items()}
        teacher = taps["teacher"]
        layers, heads = len(teacher.attention_maps), teacher.attention_maps[0].shape[1]
        result.num_layers, result.num_heads = layers, heads

        if len(hessian_batches) < config.hessian.batches and config.hessian.enabled:
            labelled = dict(batch)
            if "labels" not in labelled:
                logits = teacher.logits
                labelled["labels"] = logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1)
            hessian_batches.append(labelled)

        with torch.no_grad():
            for name in models:
                ps = positions.setdefault(name, _PositionSum(layers))
                for layer, y in enumerate(taps[name].attention_outputs):
                    low, high, count = position_range_sums(y, mask)
                    ps.add(layer, low, high, count, first_layer=layer == 0)

            teacher_f = [_sa_prop(models["teacher"], l, teacher.layer_outputs[l], heads) for l in range(layers)]
            for name in compared:
                student = taps[name]
                for layer in range(layers):
                    t_map, s_map = teacher.attention_maps[layer], student.attention_maps[layer]
                    cover = cover_length_ratio(t_map, s_map, mask, config.cover_top_k)
                    ranking = pairwise_ranking_loss(t_map, s_map, mask, config.ranking_margin)
                    for metric, rows in (("cover_length_ratio", cover), ("ranking_loss", ranking)):
                        valid = ~torch.isnan(rows)
                        acc((name, metric, layer), torch.nansum(rows, dim=(0, 2)), valid.sum(dim=(0, 2)))
                    student_f = _sa_prop(models[name], layer, student.layer_outputs[layer], heads)
                    for tokens in token_sets:
                        token_mask = None if tokens == "all" else special
                        total, count = sa_gen_distance_sums(t_map, s_map, mask, token_mask)
                        acc((name, "sa_gen", tokens, layer), total, count.expand_as(total))
                        total, count = sa_prop_distance_sums(teacher_f[layer], student_f, mask, token_mask)
                        acc((name, "sa_prop", tokens, layer), total, count.expand_as(total))
                for kind in ("layer_outputs", "attention_outputs"):
                    total, count = squared_error_sums(getattr(teacher, kind), getattr(student, kind), mask)
                    acc((name, "mse", kind), total, count)

            example = config.heatmap_example - seen
            if 0 <= example < size:
                n = int(mask[example].sum())
                chosen_layers = config.heatmap_layers or list(range(layers))
                for layer in chosen_layers:
                    for head in config.heatmap_heads:
                        if layer >= layers or head >= heads:
                            raise ConfigError("analysis.heatmap_layers" if layer >= layers else "analysis.heatmap_heads",
                                              f"layer {layer} / head {head} is outside the model "
                                              f"({layers} layers, {heads} heads)")
                        result.heatmaps[(layer, head)] = {
                            name: taps[name].attention_maps[layer][example, head, :n, :n].float().cpu().numpy()
                            for name in models}
                ids = batch["input_ids"][example, :n].tolist()
                result.heatmap_tokens = id_to_token(ids) if id_to_token else [str(i) for i in ids]
        seen += size

    if seen == 0:
        raise ValueError("no examples to analyze")
    if config.heatmap_example >= seen:
        raise ConfigError("analysis.heatmap_example", f"got {config.heatmap_example}; only {seen} examples were analyzed")
    result.num_examples = seen
    layers = result.num_layers
    for name in compared:
        result.heads[name] = {metric: np.stack([sums[(name, metric, l)].mean() for l in range(layers)])
                              for metric in ("cover_length_ratio", "ranking_loss")}
        result.mse[name] = {kind: sums[(name, "mse", kind)].mean() for kind in ("layer_outputs", "attention_outputs")}
        result.sa[name] = {tokens: {kind: np.stack([sums[(name, kind, tokens, l)].mean() for l in range(layers)])
                                    for kind in ("sa_gen", "sa_prop")} for tokens in token_sets}
    for name, ps in positions.items():
        result.ranges[name] = ps.means()

    if config.hessian.enabled:
        for name in config.hessian.models:
            if name in models:
                result.hessian[name] = hessian_of_model(models[name], hessian_batches, config.hessian, device)
    return result
