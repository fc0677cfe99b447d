"""Per-rank memory of a KD-QAT run by part, its peak, the largest micro batch that fits, and what to change.

All figures are bytes per rank. ``P`` is the task model's parameter count (teacher and student have the same),
``N`` the world size, ``w`` the bytes of a model weight (4 in fp32, 2 under ``bf16``/``fp16``: DeepSpeed casts
the engine's module), ``w_g`` of a gradient (``w``, or 4 with ``data_types.grad_accum_dtype: "fp32"``), ``o`` of
the optimizer state per parameter (8 for Adam-style: ``exp_avg`` and ``exp_avg_sq`` in fp32; Adafactor's factored
state is counted as 0), ``P/N`` ZeRO's share (exactly Σ⌈numel/N⌉).

Resident for the whole stage:

============================  ==========================================================================
student weights               ``w·P``; ZeRO-3: ``w·(P/N + persistent)`` (parameters of at most
                              ``stage3_param_persistence_threshold`` elements stay whole on every rank)
fp32 master weights           none in fp32 at stage 0; ``4·P`` at stage 0 under bf16/fp16; ``4·P/N`` at
                              stages 1-3 (DeepSpeed clones its fp32 partition even when training in fp32)
optimizer states              ``o·P`` (stage 0), ``o·P/N`` (1-3); ``offload_optimizer`` moves master and
                              optimizer states (and ZeRO-3's gradient partition) to the host
gradient partition            ZeRO-2: ``w·P/N``; ZeRO-3: ``w_g·P/N`` (kept between steps)
ZeRO buckets                  contiguous-gradient buckets of ``reduce_bucket_size`` elements (×2 with
                              ``overlap_comm`` at stages 1-2): on CUDA reserved whole, on CPU only the
                              touched ``min(P, bucket)`` elements count
teacher weights               ``t·P`` replicated, or under ZeRO-3 with ``kdqat.model.partition_teacher`` its
                              own engine's ``t·(P/N + persistent)`` (none of ``P/N`` with ``offload_param``),
                              where ``t`` is 4 with ``kdqat.model.teacher_precision: "fp32"`` (also in a
                              bf16/fp16 run) and 2 with ``"bf16"``; ``"int8_dynamic"`` (replicated only):
                              ``1·P_lin + 4·(P − P_lin)``, ``P_lin`` the ``nn.Linear`` weight elements (int8
                              codes; biases, embeddings and LayerNorms stay fp32; see
                              :mod:`ds_kdqat.training.teacher`)
LAT state                     ``4·P_lat`` (second moment ``v``, or the first step's gradient accumulator) +
                              ``4·P_lat`` more with ``lat.second_moment: "own"`` (accumulator and ``v``)
fixed overhead                CPU: the process (:data:`CPU_PROCESS_OVERHEAD`); CUDA: the context
                              (:data:`CUDA_CONTEXT`) and, with N > 1, NCCL's buffers (:data:`NCCL_BUFFERS`)
============================  ==========================================================================

Phases, whose largest total is the estimate (``per_rank_total_bytes``):

* ``forward/backward``: activations, quantized weight copies and taps (:mod:`.trace`, counted on proxies of the
  model), gradients, ZeRO-3's gathered parameters (``min(P − persistent, largest + stage3_prefetch_bucket_size)``)
  and a backward workspace of one layer's saved tensors at their float size (the backward rebuilds those kept as
  int8 codes). The end of the forward holds activations + quantized copies + taps (+ the gradients when
  accumulating over micro batches); the backward frees a layer's activations as it makes its gradients, so it
  holds ``max(activations + quantized copies, gradients)`` + the taps (the losses' gradients w.r.t. the student's
  taps, which wait for their layer's backward, are about their size; not with checkpointing) + the workspace. With activation checkpointing
  (``kdqat.train.activation_checkpointing``, :mod:`ds_kdqat.models.checkpointing`): each layer's input
  ``B·S·D·w`` + one layer's activations at their float size (a recomputed layer saves floats) and quantized
  copies (recomputed in the backward; at the end of the forward this share stands for what is kept outside the
  layers: embeddings, head, losses)
  + all taps (``taps_all``: the teacher's and student's taps, which the forward keeps in any case; in a
  Teacher-Intervention phase the intervened teacher tensors are among them and are held until their layer's
  backward). On CPU, for a 4-layer hidden-256 BERT at B=8, S=128 (ternarybert, TI-M), the figures match the
  measured step (bench/bench_checkpointing.py) to the same degree with and without checkpointing.
* ``optimizer step``: gradients (stage 0-1 whole, ``w_g·P``), ZeRO-1/2's fp32 gradient partition ``4·P/N``,
  the optimizer's temporary (BertAdam/Adafactor per tensor: its largest tensor; AdamW on CUDA is ``foreach``:
  one fp32 copy of all it updates), stage 0's flat all-reduce bucket ``w_g·min(P, 5e8)``, bf16/fp16 stage 0's
  fp32 gradients of the master copy ``4·P``.
* ``saving`` (CPU only; on GPUs this is host memory): DeepSpeed clones the module state (``w·P``; stage 0 also
  the optimizer state) before ``torch.save``, and the best student's safetensors bytes are another ``w·P``.
* ``end of run``: the best student is reloaded (fp32, ``4·P``) with its cached quantized weights (``4·P_q``) for
  the final evaluation and export, next to everything resident, plus one layer's activations; on CPU also the
  packed export and its int8 evaluation (:data:`CPU_EXPORT_WORKSPACE`) and ZeRO-1/2's last gradient buckets.
  (With ``teacher_precision`` other than fp32 the fp32 teacher is loaded again just before, ``4·P`` in place of
  the released KD teacher, for its dev metrics: less than this phase, so not a phase of its own.)

Allowances: CUDA's caching allocator keeps freed blocks (fragmentation): :data:`CUDA_ALLOCATOR_SLACK` of the
phase total. CPU figures are for ranks run with ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc then returns large freed
blocks); without it RSS can grow further (see docs/benchmarks.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

from ..errors import ConfigError
from .shape import ModelShape
from .trace import ActivationModel

MiB = 2**20
GiB = 2**30

# Resident set of one CPU rank besides what the estimate counts: interpreter, torch, transformers, DeepSpeed (gloo
# process group, shared-memory op), the metrics, export and int8-backend code loaded at the first evaluation,
# tokenizer, data, the loop, and the allocator's arenas. Measured with bench/bench_memory.py --overhead: peak RSS
# (VmHWM) of a whole KD-QAT run of a 1-layer, hidden-8 BERT (30,522-word vocabulary, micro batch 1, sequence 8)
# minus the 7 MiB the estimate counts for its models and steps: 586 MiB − 7 MiB with 1 rank, 586/581 MiB − 7 MiB
# with 2 ranks (gloo), on the 2-core development machine, torch 2.13.0 CPU, transformers 5.24, DeepSpeed 0.19.8,
# MALLOC_MMAP_THRESHOLD_=65536 (docs/benchmarks.md). Per rank, the same for 1 and 2 ranks.
CPU_PROCESS_OVERHEAD = 580 * MiB
# CPU only: what the end of a run adds besides the reloaded best student and its quantized copies (the packed
# export: codes and scales of every weight, the files' bytes; the int8 backend's model and its evaluation), in
# units of the student's fp32 size 4·P. Measured with bench/bench_memory.py as the end-of-run peak minus the rest
# of the estimate's end-of-run phase: 2.5 to 5.5 × 4·P over its eight configurations (MiniLM-L6 and a 4-layer
# hidden-256 BERT; ZeRO 0-3; 1 and 2 ranks); the middle of that range is taken. On GPUs this is host memory.
CPU_EXPORT_WORKSPACE = 4.0
# CUDA context of one process (kernels, cuBLAS/cuDNN handles; lazy module loading): 300-500 MiB on A100/H100
# with CUDA 12; the upper end is taken. Not measured here (no GPU on the development machine).
CUDA_CONTEXT = 500 * MiB
# NCCL's communication buffers per rank when N > 1 (4 MiB NCCL_BUFFSIZE × channels × peers): a typical
# single-node figure; more with many channels or nodes. Not measured here.
NCCL_BUFFERS = 256 * MiB
# Fraction added on CUDA for the caching allocator's fragmentation (freed blocks it keeps).
CUDA_ALLOCATOR_SLACK = 0.10
# The smaller gradient bucket recommendations try (DeepSpeed's default reduce_bucket_size is 5e8 elements, a
# reserved 1-2 GB per buffer on CUDA).
SMALL_BUCKET = 50_000_000
# Elements of stage 0's flat all-reduce bucket (DeepSpeed's MEMORY_OPT_ALLREDUCE_SIZE).
STAGE0_ALLREDUCE_BUCKET = 500_000_000

OPTIMIZER_STATE_BYTES = {"bertadam": 8, "adamw": 8, "adafactor": 0}
PRECISIONS = {"fp32": 4, "bf16": 2, "fp16": 2}
PHASES = ("forward/backward", "optimizer step", "saving", "end of run")


@dataclass(frozen=True)
class Settings:
    """What decides the memory besides the model (read from a ds_config by :func:`settings_from_run`)."""

    world_size: int = 1
    device: str = "cuda"
    micro_batch: int = 8
    accumulation: int = 1
    seq: int = 128
    stage: int = 0
    precision: str = "fp32"
    grad_accum_fp32: bool = False
    offload_optimizer: bool = False
    offload_param: bool = False
    optimizer: str = "bertadam"
    partition_teacher: bool = True
    teacher_precision: str = "fp32"
    activation_checkpointing: bool = False
    reduce_bucket_size: int = 500_000_000
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    prefetch_bucket_size: int = 50_000_000
    persistence_threshold: int = 100_000
    sub_group_size: int = 1_000_000_000

    @property
    def weight_bytes(self) -> int:
        return PRECISIONS[self.precision]

    @property
    def grad_bytes(self) -> int:
        return 4 if self.grad_accum_fp32 else self.weight_bytes

    @property
    def teacher_partitioned(self) -> bool:
        return self.stage == 3 and self.partition_teacher

    @property
    def teacher_dtype(self) -> str:
        """The dtype of the teacher's taps: bfloat16 for a bf16 teacher, float32 otherwise (an int8_dynamic
        teacher's linears return float32)."""
        return "bfloat16" if self.teacher_precision == "bf16" else "float32"

    @property
    def teacher_weight_bytes(self) -> int:
        """Bytes of one teacher weight in fp32/bf16 (``int8_dynamic`` is counted per kind of weight instead)."""
        return 2 if self.teacher_precision == "bf16" else 4

    @property
    def dtype_name(self) -> str:
        return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[self.precision]


def _offload_device(section: Any, key: str) -> bool:
    if section is None:
        return False
    if not isinstance(section, dict):
        raise ConfigError(key, f"got {section!r}; expected an object with \"device\"")
    device = section.get("device", "none")
    if device not in ("none", "cpu", "nvme", None):
        raise ConfigError(f"{key}.device", f"got {device!r}; allowed: \"none\", \"cpu\", \"nvme\"")
    return device in ("cpu", "nvme")


def settings_from_run(run, world_size: int, device: str, seq: Optional[int] = None,
                      activation_checkpointing: Optional[bool] = None) -> Settings:
    """The :class:`Settings` of a loaded :class:`~ds_kdqat.config.RunConfig` on ``world_size`` ranks."""
    ds = run.deepspeed
    zero = ds.get("zero_optimization", {}) or {}
    precision = "bf16" if (ds.get("bf16") or {}).get("enabled") else "fp16" if (ds.get("fp16") or {}).get(
        "enabled") else "fp32"
    stage = run.zero_stage
    grad_accum = str((ds.get("data_types") or {}).get("grad_accum_dtype") or "").lower()
    if activation_checkpointing is None:
        activation_checkpointing = run.kdqat.train.activation_checkpointing
    offload_optimizer = _offload_device(zero.get("offload_optimizer"), "zero_optimization.offload_optimizer")
    offload_param = _offload_device(zero.get("offload_param"), "zero_optimization.offload_param")
    if offload_param and stage != 3:
        raise ConfigError("zero_optimization.offload_param", f"parameters are offloaded only at stage 3 (stage is "
                          f"{stage})")
    if offload_optimizer and stage == 0:
        raise ConfigError("zero_optimization.offload_optimizer", "needs zero_optimization.stage 1, 2 or 3")

    def number(key: str, default: int) -> int:
        value = zero.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"zero_optimization.{key}", f"got {value!r}; expected a number >= 0")
        return int(value)

    overlap = zero.get("overlap_comm")
    return Settings(
        world_size=world_size, device=device, micro_batch=run.micro_batch_size,
        accumulation=run.gradient_accumulation_steps,
        seq=int(seq if seq is not None else run.kdqat.data.max_seq_length),
        stage=stage, precision=precision, grad_accum_fp32=grad_accum in ("fp32", "float32", "torch.float32"),
        offload_optimizer=offload_optimizer, offload_param=offload_param, optimizer=run.kdqat.train.optimizer,
        partition_teacher=run.kdqat.model.partition_teacher, teacher_precision=run.kdqat.model.teacher_precision,
        activation_checkpointing=activation_checkpointing,
        reduce_bucket_size=number("reduce_bucket_size", 500_000_000),
        overlap_comm=bool(stage == 3 if overlap is None else overlap),
        contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
        prefetch_bucket_size=number("stage3_prefetch_bucket_size", 50_000_000),
        persistence_threshold=number("stage3_param_persistence_threshold", 100_000),
        sub_group_size=number("sub_group_size", 1_000_000_000),
    )


@dataclass
class Estimate:
    """One estimate. ``parts``: the peak phase by part (they sum to ``per_rank_total_bytes``); ``phases``: each
    phase's total; ``components``: every part of every phase."""

    per_rank_total_bytes: int
    peak_phase: str
    parts: dict[str, int]
    phases: dict[str, int]
    components: dict[str, dict[str, int]]
    settings: Settings
    notes: list[str] = field(default_factory=list)


def _ceil(x: float) -> int:
    return int(math.ceil(x))


def _bucket(elements: int, params: int, settings: Settings) -> int:
    """Elements of a gradient bucket that count: the whole bucket on CUDA (reserved), the touched part on CPU."""
    return elements if settings.device == "cuda" else min(elements, params)


def estimate_memory(shape: ModelShape, acts: ActivationModel, settings: Settings,
                    micro_batch: Optional[int] = None) -> Estimate:
    """The :class:`Estimate` of ``shape`` trained with ``settings`` at ``micro_batch`` (default: the settings')."""
    s = settings
    batch = s.micro_batch if micro_batch is None else micro_batch
    cpu = s.device == "cpu"
    P, N = shape.params, s.world_size
    share = shape.partition_numel if N > 1 else P
    w, wg = s.weight_bytes, s.grad_bytes
    o = OPTIMIZER_STATE_BYTES[s.optimizer]
    offload_opt = s.offload_optimizer and not cpu  # on a CPU device "offloading" moves nothing anywhere else
    offload_param = s.offload_param and not cpu
    notes = list(filter(None, [acts.dtype_note]))
    if cpu:
        notes.append("CPU figures are for ranks run with MALLOC_MMAP_THRESHOLD_=65536; with glibc's default, "
                     "resident memory was about a third higher (docs/benchmarks.md)")
    if cpu and (s.offload_optimizer or s.offload_param):
        notes.append("offload settings change nothing on --device cpu: host memory is the device memory")

    resident: dict[str, int] = {}
    # student
    if s.stage == 3:
        resident["student weights"] = w * (0 if offload_param else share) + w * shape.persistent
    else:
        resident["student weights"] = w * P
    if s.stage == 0:
        resident["fp32 master weights"] = 4 * P if w < 4 else 0
        resident["optimizer states"] = o * P
    else:
        resident["fp32 master weights"] = 0 if offload_opt else 4 * share
        resident["optimizer states"] = 0 if offload_opt else o * share
    if s.stage == 2:
        resident["gradients"] = 0 if offload_opt else w * share
    elif s.stage == 3:
        resident["gradients"] = 0 if offload_opt else wg * share
    buckets = 0
    if s.stage >= 1 and s.contiguous_gradients:
        copies = 2 if (s.overlap_comm and s.stage in (1, 2)) else 1
        bucket_bytes = wg if s.stage == 1 else w  # ZeRO-1 accumulates in grad_accum_dtype when it differs
        buckets = copies * bucket_bytes * _bucket(s.reduce_bucket_size, P, s)
    if s.stage == 3:
        resident["ZeRO buckets"] = buckets  # allocated when the optimizer is built
    # teacher (kdqat.model.teacher_precision)
    t = s.teacher_weight_bytes
    if s.teacher_partitioned:
        resident["teacher weights"] = t * (0 if offload_param else share) + t * shape.persistent
    elif s.teacher_precision == "int8_dynamic":
        resident["teacher weights"] = shape.linear + 4 * (P - shape.linear)
    else:
        resident["teacher weights"] = t * P
    resident["LAT state"] = 4 * shape.lat + 4 * shape.lat_own
    if cpu:
        resident["fixed overhead"] = CPU_PROCESS_OVERHEAD
    else:
        resident["fixed overhead"] = CUDA_CONTEXT + (NCCL_BUFFERS if N > 1 else 0)

    # forward/backward: the worst of the recipe's phases
    full_grads = wg * P if s.stage in (0, 1) else 0
    train = max((_forward_backward(p, shape, s, batch, full_grads) for p in acts.phases),
                key=lambda parts: sum(parts.values()))
    workspace = max(_backward_workspace(p, shape, batch) for p in acts.phases)
    if s.stage == 3:  # ZeRO-3 gathers the parameters of the modules it runs, and prefetches
        train["gathered parameters"] = w * min(P - shape.persistent, shape.largest + s.prefetch_bucket_size)
    elif s.stage in (1, 2):
        train["ZeRO buckets"] = buckets

    # optimizer step
    step: dict[str, int] = {"gradients": full_grads}
    largest = 4 * shape.largest
    if s.stage == 0:
        step["all-reduce bucket"] = wg * min(P, STAGE0_ALLREDUCE_BUCKET)
        temp = 4 * P if (s.optimizer == "adamw" and not cpu) else largest
        step["optimizer workspace"] = temp + (4 * P if w < 4 else 0)
    else:
        if s.stage in (1, 2):
            step["ZeRO buckets"] = buckets
        fp32_grads = 4 * (min(share, s.sub_group_size) if s.stage == 3 else share)
        temp = 4 * share if s.optimizer in ("bertadam", "adamw") else 0
        step["optimizer workspace"] = 0 if offload_opt else fp32_grads + temp

    # saving (host memory: counted on CPU only)
    saving: dict[str, int] = {}
    if cpu:
        module = w * (share if s.stage == 3 else P)
        clone = module + (o * P if s.stage == 0 else 0)
        hf_bytes = w * P + (w * P if s.stage == 3 else 0)
        saving["state-dict copies"] = max(clone, hf_bytes)

    # end of run: the best student reloaded (fp32) with its cached quantized weights, evaluated; on CPU also the
    # export and its int8 evaluation (on GPUs they run on the host) and ZeRO-1/2's last gradient buckets
    end = {"best student reloaded": 4 * P + 4 * shape.quantized, "evaluation workspace": workspace}
    if cpu:
        end["export and int8 evaluation"] = CPU_EXPORT_WORKSPACE * 4 * P
        if s.stage in (1, 2):
            end["ZeRO buckets"] = buckets

    phases_parts = {"forward/backward": train, "optimizer step": step, "saving": saving, "end of run": end}
    components: dict[str, dict[str, int]] = {}
    totals: dict[str, int] = {}
    for name, extra in phases_parts.items():
        if name == "saving" and not cpu:
            continue
        parts = {**resident, **{k: _ceil(v) for k, v in extra.items() if v}}
        parts = {k: int(v) for k, v in parts.items()}
        if not cpu:
            slack_base = sum(v for k, v in parts.items() if k != "fixed overhead")
            parts["allocator slack"] = _ceil(CUDA_ALLOCATOR_SLACK * slack_base)
        components[name] = parts
        totals[name] = sum(parts.values())
    peak = max(totals, key=totals.get)
    return Estimate(per_rank_total_bytes=totals[peak], peak_phase=peak, parts=components[peak], phases=totals,
                    components=components, settings=replace(s, micro_batch=batch), notes=notes)


def _backward_workspace(phase, shape: ModelShape, batch: int) -> float:
    """One layer's gradient temporaries: its saved tensors at their float size, since the backward rebuilds
    the operands kept as int8 codes (activations and weights) before using them."""
    return (phase.rebuilt_per_example * batch + phase.rebuilt_fixed) / max(1, shape.layers)


def _forward_backward(phase, shape: ModelShape, s: Settings, batch: int, full_grads: int) -> dict[str, float]:
    """The parts of one recipe phase's forward/backward peak (see the module docstring)."""
    layers = max(1, shape.layers)
    if s.activation_checkpointing:
        inputs = layers * batch * shape.seq * shape.hidden * s.weight_bytes  # every layer's input
        activations = inputs + phase.rebuilt_per_example * batch / layers  # + one layer recomputed (floats)
        quantized = phase.saved_fixed / layers
        taps = phase.taps_all_per_example * batch + phase.taps_all_fixed
    else:
        activations = phase.saved_per_example * batch
        quantized = phase.saved_fixed
        taps = phase.taps_per_example * batch + phase.taps_fixed
    workspace = _backward_workspace(phase, shape, batch)
    forward_end = activations + quantized + taps + (full_grads if s.accumulation > 1 else 0)
    # Without checkpointing the losses' backward runs first and its gradients w.r.t. the student's taps (about the
    # taps' size) wait for their layer's backward while the last layer rebuilds its operands (measured: the peak is
    # the forward's end + one layer's workspace); a checkpointed step's backward peak stays below its forward's end.
    waiting = 0 if s.activation_checkpointing else taps
    backward = max(activations + quantized, full_grads) + waiting + workspace
    if forward_end >= backward:
        return {"activations": activations, "quantized weight copies": quantized, "taps": taps,
                "gradients": full_grads if s.accumulation > 1 else 0}
    share_act = activations + quantized >= full_grads
    return {"activations": activations if share_act else 0, "quantized weight copies": quantized if share_act else 0,
            "taps": waiting, "gradients": 0 if share_act else full_grads, "backward workspace": workspace}


def largest_micro_batch(shape: ModelShape, acts: ActivationModel, settings: Settings, budget: int,
                        limit: int = 1 << 16) -> int:
    """The largest micro batch whose estimate fits in ``budget`` bytes (0 when not even 1 does)."""
    def fits(batch: int) -> bool:
        return estimate_memory(shape, acts, settings, batch).per_rank_total_bytes <= budget

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    if high > limit:
        return limit
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


@dataclass(frozen=True)
class Recommendation:
    """A change of settings and the largest micro batch it allows."""

    change: str
    settings: Settings
    max_micro_batch: int
    per_rank_total_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"change": self.change, "max_micro_batch": self.max_micro_batch,
                "per_rank_total_bytes": self.per_rank_total_bytes,
                "settings": {k: v for k, v in asdict(self.settings).items()
                             if k in ("stage", "activation_checkpointing", "offload_optimizer", "offload_param",
                                      "micro_batch", "accumulation")}}


def recommendations(shape: ModelShape, acts: ActivationModel, settings: Settings, budget: int,
                    ckpt_key: str = "--activation_checkpointing") -> list[Recommendation]:
    """Changes that make the configured micro batch fit, cheapest first: gradient accumulation over smaller
    micro batches, a higher ZeRO stage, activation checkpointing, optimizer offload, parameter offload (the
    combinations in that order); each with its largest micro batch."""
    s = settings
    candidates: list[tuple[str, Settings]] = []
    stages = [stage for stage in (1, 2, 3) if stage > s.stage and s.world_size > 1]
    small = SMALL_BUCKET
    if s.device == "cuda" and s.reduce_bucket_size > small:
        if s.stage >= 1:
            candidates.append((f"zero_optimization.reduce_bucket_size={small:.0e}",
                               replace(s, reduce_bucket_size=small)))
        stages_small = [(stage, replace(s, stage=stage, reduce_bucket_size=small)) for stage in stages]
    else:
        stages_small = []
    for stage in stages:
        candidates.append((f"zero_optimization.stage={stage}", replace(s, stage=stage)))
    for stage, candidate in stages_small:
        candidates.append((f"zero_optimization.stage={stage} + reduce_bucket_size={small:.0e}", candidate))
    if not s.activation_checkpointing:
        candidates.append((f"{ckpt_key}", replace(s, activation_checkpointing=True)))
        for stage in stages:
            candidates.append((f"zero_optimization.stage={stage} + {ckpt_key}",
                               replace(s, stage=stage, activation_checkpointing=True)))
    if s.device == "cuda":
        base = max(s.stage, 2)
        if not s.offload_optimizer:
            candidates.append((f"zero_optimization.stage={base} + offload_optimizer.device=cpu + {ckpt_key}",
                               replace(s, stage=base, offload_optimizer=True, activation_checkpointing=True)))
        candidates.append((f"zero_optimization.stage=3 + offload_optimizer/offload_param.device=cpu + {ckpt_key}",
                           replace(s, stage=3, offload_optimizer=True, offload_param=True,
                                   activation_checkpointing=True)))
    found = []
    own = largest_micro_batch(shape, acts, s, budget)
    if own >= 1:
        steps = math.ceil(s.micro_batch / own) * s.accumulation
        found.append(Recommendation(f"train_micro_batch_size_per_gpu={own} with gradient_accumulation_steps="
                                    f"{steps} (about as many examples per optimizer step)",
                                    replace(s, micro_batch=own, accumulation=steps), own,
                                    estimate_memory(shape, acts, s, own).per_rank_total_bytes))
    for change, candidate in candidates:
        best = largest_micro_batch(shape, acts, candidate, budget)
        if best >= 1:
            batch = min(best, s.micro_batch)
            found.append(Recommendation(change, replace(candidate, micro_batch=batch), best,
                                        estimate_memory(shape, acts, candidate, batch).per_rank_total_bytes))
    # configurations that keep the configured micro batch first, then by how much they allow
    found.sort(key=lambda r: (r.max_micro_batch < s.micro_batch, 0))
    return found
