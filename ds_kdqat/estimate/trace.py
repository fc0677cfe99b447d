"""Activation and tap memory of one KD-QAT micro step, measured on narrow copies of the real model and
extrapolated exactly.

What one step holds at its peak besides parameters, gradients and optimizer states is decided by code that
changes (the family's modules, the quantizers, the kdqat attention function, the taps each recipe records, the
losses), so it is not written down as a formula here: it is *counted*. The real step
(:func:`ds_kdqat.distill.step.kd_forward`: teacher forward with its taps, interventions, student forward with
its taps, the objective) runs on CPU on *proxies* of the model: the same family, number of layers, heads,
sequence length, vocabulary and head, but head size ``d`` and FFN size ``f`` cut to a few units. The objective
is wrapped to see the two forwards' taps and, at that moment, the student's autograd graph; the graph behind the
loss is walked once more after the step. What a graph keeps for its backward is read from its nodes (their
``_saved_*`` tensors, and ``saved_tensors`` of custom functions): distinct live storages, parameters excluded.

Every kept tensor's size is a monomial of degree ≤ 2 in (batch B, head size d, FFN size f): activations are
``B·S·H·d``, ``B·S·f``, ``B·H·S²`` …; fake-quantized weight copies are ``(H·d)²``, ``H·d·f``, ``V·H·d``. So the
bytes kept are exactly ``c·[1, B, B·d, B·f, d, d², d·f]``; twelve proxy steps (B ∈ {1, 2}, six (d, f) pairs)
fix ``c`` by least squares (the residual is 0 up to rounding; a non-zero residual means a tensor of another
form and raises). Evaluated at the real ``d`` and ``f``: the B-proportional part is the activations (per
example), the B-free part the quantized weight copies (plus constants such as T5's position bias).

Three quantities are fitted per phase of the recipe (Teacher Intervention has several; the estimate takes the
largest):

* ``saved``: what the student's forward keeps for its backward (autograd's saved tensors);
* ``taps``: what is alive on top of that when the objective has been computed: the teacher's recorded taps,
  the student's recorded taps that autograd does not keep anyway, and what the losses keep for their backward;
* ``taps_all``: the teacher's and student's taps and the losses' saved tensors, without subtracting what the
  forward keeps (what activation checkpointing leaves alive, since it drops the forward's saved tensors);
* ``saved_float``: ``saved`` with every tensor counted at its own size, also those kept as int8 codes
  (:mod:`ds_kdqat.quant.codes`): what the backward rebuilds, one layer at a time, and what a checkpointed layer's
  recomputation keeps (it saves floats).

The proxies run in the dtypes of the run (student in bf16/fp16 when enabled; the teacher in fp32 unless ZeRO-3
partitions it, when DeepSpeed casts it too), so fp32 softmax outputs in a bf16 run are counted as such. Where
CPU lacks a half-precision kernel the proxies run in fp32 and floating-point bytes are scaled (noted).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .shape import FAMILY_KEYS, build_task_model

# (head size, FFN size) of the proxies; with B ∈ {1, 2} they fix the seven coefficients
PROXY_POINTS = ((1, 1), (2, 1), (1, 2), (2, 2), (3, 1), (1, 3))
PROXY_BATCHES = (1, 2)
QUANTITIES = ("saved", "taps", "taps_all", "saved_float")


@dataclass(frozen=True)
class PhaseMemory:
    """Bytes of one phase's step at the real shape: ``per_example`` (× micro batch) and ``fixed`` parts."""

    phase: str
    saved_per_example: float
    saved_fixed: float
    taps_per_example: float
    taps_fixed: float
    taps_all_per_example: float
    taps_all_fixed: float
    saved_float_per_example: Optional[float] = None  # None: as saved (no tensor kept as codes)
    saved_float_fixed: Optional[float] = None

    @property
    def rebuilt_per_example(self) -> float:
        """Per-example bytes of the saved tensors at their float size (``saved_float``)."""
        return self.saved_per_example if self.saved_float_per_example is None else self.saved_float_per_example

    @property
    def rebuilt_fixed(self) -> float:
        return self.saved_fixed if self.saved_float_fixed is None else self.saved_float_fixed


@dataclass(frozen=True)
class ActivationModel:
    """The fitted phases and how they were obtained (``dtype_note``: empty, or why fp32 was scaled)."""

    phases: tuple[PhaseMemory, ...]
    dtype_note: str = ""


def _features(batch: int, d: float, f: float) -> list[float]:
    return [1.0, batch, batch * d, batch * f, d, d * d, d * f]


def _proxy_config(config, family: str, d: int, f: int):
    hidden_key, ffn_key, heads_key, head_key, _ = FAMILY_KEYS[family]
    proxy = copy.deepcopy(config)
    heads = getattr(proxy, heads_key)
    setattr(proxy, hidden_key, heads * d)
    setattr(proxy, ffn_key, f)
    if head_key:
        setattr(proxy, head_key, d)
    # dropout stays as configured: its masks are part of what training keeps
    return proxy


def _batch(config, pixels: bool, batch: int, seq: int, task_type: str, num_labels: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    if pixels:
        size = config.image_size
        inputs = {"pixel_values": torch.randn(batch, config.num_channels, size, size, generator=generator)}
    else:
        high = max(6, min(int(getattr(config, "vocab_size", 1000) or 1000), 1000))
        ids = torch.randint(5, high, (batch, seq), generator=generator)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    if task_type == "regression":
        inputs["labels"] = torch.zeros(batch)
    elif task_type == "classification":
        inputs["labels"] = torch.zeros(batch, dtype=torch.long) % max(1, num_labels)
    return inputs


def _tensors(taps) -> list:
    import torch

    found = []
    if taps is None:
        return found
    for field in dataclasses.fields(taps):
        value = getattr(taps, field.name)
        values = value if isinstance(value, list) else [value]
        found.extend(v for v in values if isinstance(v, torch.Tensor))
    return found


def _graph_storages(roots, params: set[int], as_kept: bool = True) -> dict[int, int]:
    """{storage address: bytes} of every tensor the autograd graph behind ``roots`` (tensors) keeps for its
    backward (``_saved_*`` of built-in nodes, ``saved_tensors`` of custom functions), parameters excluded; with
    ``as_kept`` a fake-quantized tensor kept as its codes counts the codes' bytes
    (:func:`~ds_kdqat.quant.codes.kept_bytes`), else its own."""
    import torch

    from ..quant.codes import kept_bytes

    found: dict[int, int] = {}

    def add(value) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.data_ptr() not in params:
                found[storage.data_ptr()] = kept_bytes(storage) if as_kept else storage.nbytes()
        elif isinstance(value, (tuple, list)):
            for item in value:
                add(item)

    stack = [t.grad_fn for t in roots if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    seen = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if name.startswith("_saved_"):
                try:
                    add(getattr(node, name))
                except RuntimeError:  # a saved value already freed
                    pass
        if hasattr(node, "saved_tensors"):  # a custom autograd Function
            try:
                add(node.saved_tensors)
            except RuntimeError:
                pass
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _storages(tensors, params: set[int]) -> dict[int, int]:
    out = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            out[storage.data_ptr()] = storage.nbytes()
    return out


def _measure(config, family: str, pixels: bool, seq: int, batches, phases_of, quant, task_type: str,
             num_labels: int, student_dtype, teacher_dtype) -> dict[int, dict[str, list[float]]]:
    """One proxy step per micro batch in ``batches`` and phase: {batch: {phase name: [saved, taps, taps_all,
    saved_float] bytes}}, each a set of live storages:
    ``forward`` = what the student's graph keeps when the objective starts; ``full`` = what the graph behind the
    loss keeps (forward and losses); ``taps`` = the storages of both forwards' taps (alive until the objective
    returns). saved = forward; taps = (full ∪ taps) − forward; taps_all = taps ∪ (full − forward)."""
    import torch

    from ..quant import quantize_model

    torch.manual_seed(0)
    teacher = build_task_model(config, task_type).eval()
    student = copy.deepcopy(teacher)
    quantize_model(student, quant)
    teacher.to(teacher_dtype)
    student.to(student_dtype).train()
    params = {p.untyped_storage().data_ptr() for p in student.parameters()}
    params |= {p.untyped_storage().data_ptr() for p in teacher.parameters()}
    results: dict[int, dict[str, list[float]]] = {}
    for batch in batches:
        batch_inputs = _batch(config, pixels, batch, seq, task_type, num_labels)
        if "pixel_values" in batch_inputs:
            batch_inputs["pixel_values"] = batch_inputs["pixel_values"].to(teacher_dtype)
        results[batch] = _measure_phases(teacher, student, batch_inputs, phases_of(student), params)
    return results


def _measure_phases(teacher, student, batch_inputs, phases, params: set[int]) -> dict[str, list[float]]:
    from ..distill.step import kd_forward
    from ..quant.codes import tracing_saved_codes

    results = {}
    for phase in phases:
        seen: dict[str, dict[int, int]] = {}

        def objective(student_taps, teacher_taps, labels, _inner=phase.objective):
            student_tensors = _tensors(student_taps)
            seen["forward"] = _graph_storages(student_tensors, params)
            seen["forward_float"] = _graph_storages(student_tensors, params, as_kept=False)
            seen["taps"] = _storages(student_tensors + _tensors(teacher_taps), params)
            return _inner(student_taps, teacher_taps, labels)

        traced = dataclasses.replace(phase, objective=objective)
        with tracing_saved_codes():
            loss, _ = kd_forward(teacher, student, batch_inputs, traced)
            full = _graph_storages([loss], params)
            del loss
        forward, taps = seen["forward"], seen["taps"]
        extra = {**full, **taps}
        loss_only = {key: n for key, n in full.items() if key not in forward}
        results[phase.name] = [float(sum(forward.values())),
                               float(sum(n for key, n in extra.items() if key not in forward)),
                               float(sum({**taps, **loss_only}.values())),
                               float(sum(seen["forward_float"].values()))]
    return results


_CACHE: dict[tuple, ActivationModel] = {}


def fit_activations(config, family: str, pixels: bool, seq: int, distill, quant, task_type: str = "classification",
                    num_labels: int = 2, student_dtype: str = "float32", teacher_dtype: str = "float32",
                    head_dim: Optional[int] = None, ffn: Optional[int] = None) -> ActivationModel:
    """The :class:`ActivationModel` of the real ``config`` (see the module docstring). ``distill``: the
    ``kdqat.distill`` config; ``quant``: the ``kdqat.quant`` config; dtypes by name. Remembered per process
    for the same arguments."""
    key = (config.to_json_string(use_diff=False), family, pixels, seq, repr(distill), repr(quant), task_type,
           num_labels, student_dtype, teacher_dtype, head_dim, ffn)
    if key not in _CACHE:
        _CACHE[key] = _fit(config, family, pixels, seq, distill, quant, task_type, num_labels, student_dtype,
                           teacher_dtype, head_dim, ffn)
    return _CACHE[key]


def _fit(config, family, pixels, seq, distill, quant, task_type, num_labels, student_dtype, teacher_dtype,
         head_dim, ffn) -> ActivationModel:
    import torch

    from ..distill.phases import kd_phases
    from ..models.families import adapter_for_config

    hidden_key, ffn_key, heads_key, head_key, _ = FAMILY_KEYS[family]
    real_d = head_dim or (getattr(config, head_key) if head_key else
                          getattr(config, hidden_key) // getattr(config, heads_key))
    real_f = ffn or getattr(config, ffn_key)

    def run(dtype_s, dtype_t):
        rows, values = [], {}
        for d, f in PROXY_POINTS:
            proxy = _proxy_config(config, family, d, f)

            def phases_of(model, proxy=proxy):
                num_layers = len(adapter_for_config(proxy).layer_modules(model))
                phases, _ = kd_phases(distill, 1000, num_layers, task_type)
                return list(phases)

            measured = _measure(proxy, family, pixels, seq, PROXY_BATCHES, phases_of, quant, task_type, num_labels,
                                dtype_s, dtype_t)
            for batch, by_phase in measured.items():
                rows.append(_features(batch, d, f))
                for name, quantities in by_phase.items():
                    values.setdefault(name, []).append(quantities)
        return np.array(rows), values

    to_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    note, scale = "", 1.0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the proxies are tiny: one thread is fastest, and much faster on a busy machine
    try:
        try:
            rows, values = run(to_dtype[student_dtype], to_dtype[teacher_dtype])
        except (RuntimeError, NotImplementedError) as error:
            if student_dtype == "float32" and teacher_dtype == "float32":
                raise
            note = (f"CPU has no {student_dtype} kernel for a step of this model "
                    f"({str(error).splitlines()[0][:80]}); traced in float32 with floating-point bytes scaled")
            rows, values = run(torch.float32, torch.float32)
            scale = 0.5  # half-precision tensors are half the bytes (fp32 teacher taps are then undercounted)
    finally:
        torch.set_num_threads(threads)
    target = np.array(_features(1, real_d, real_f))
    phases = []
    for name, measured in values.items():
        matrix = np.array(measured)
        fitted = []
        for column in range(len(QUANTITIES)):
            coef, *_ = np.linalg.lstsq(rows, matrix[:, column], rcond=None)
            residual = np.abs(rows @ coef - matrix[:, column]).max()
            if residual > 1e-6 * max(1.0, matrix[:, column].max()):
                raise RuntimeError(f"activation fit of {QUANTITIES[column]} in phase {name} is not exact "
                                   f"(residual {residual:.0f} bytes): a kept tensor is not of the expected form")
            per_example = float(coef[1] * target[1] + coef[2] * target[2] + coef[3] * target[3]) * scale
            fixed = float(coef[0] + coef[4] * target[4] + coef[5] * target[5] + coef[6] * target[6]) * scale
            fitted += [max(0.0, per_example), max(0.0, fixed)]
        phases.append(PhaseMemory(name, *fitted))
    return ActivationModel(tuple(phases), note)
