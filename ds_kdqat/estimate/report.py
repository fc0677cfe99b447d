"""The estimate as a table for people and as JSON for scripts."""

from __future__ import annotations

from typing import Any

from . import RunEstimate
from .memory import MiB

# the order parts are listed in
PART_ORDER = ("student weights", "gradients", "fp32 master weights", "optimizer states", "ZeRO buckets",
              "gathered parameters", "all-reduce bucket", "optimizer workspace", "quantized weight copies",
              "LAT state", "teacher weights", "activations", "taps", "backward workspace", "state-dict copies",
              "best student reloaded", "evaluation workspace", "export and int8 evaluation", "fixed overhead",
              "allocator slack")


def human(n: float) -> str:
    """Bytes in MiB below 10 GiB, else GiB."""
    if n >= 10 * 1024 * MiB:
        return f"{n / 2**30:,.2f} GiB"
    return f"{n / MiB:,.1f} MiB"


def _ordered(parts: dict[str, int]) -> list[tuple[str, int]]:
    order = {name: i for i, name in enumerate(PART_ORDER)}
    return sorted(parts.items(), key=lambda item: order.get(item[0], len(order)))


def to_json(result: RunEstimate) -> dict[str, Any]:
    """``per_rank_total_bytes``, ``parts`` (name → bytes, the peak phase's, summing to the total), ``phases``
    (each phase's total), ``components`` (every phase's parts), the model, the inputs echoed, the largest micro
    batch (``max_micro_batch``, null without ``--gpu_memory``), ``fits`` and ``recommendations``."""
    est = result.estimate
    model = result.model
    return {
        "per_rank_total_bytes": est.per_rank_total_bytes,
        "peak_phase": est.peak_phase,
        "parts": dict(_ordered(est.parts)),
        "phases": est.phases,
        "components": {name: dict(_ordered(parts)) for name, parts in est.components.items()},
        "max_micro_batch": result.max_micro_batch,
        "fits": result.fits,
        "recommendations": [r.to_json() for r in result.recommendations],
        "model": {"source": result.model_source, "family": model.family, "model_type": model.model_type,
                  "parameters": model.params, "quantized_weights": model.quantized, "lat_weights": model.lat,
                  "layers": model.layers, "hidden": model.hidden, "heads": model.heads, "ffn": model.ffn,
                  "vocab": model.vocab, "seq": model.seq},
        "inputs": result.inputs,
        "notes": est.notes,
    }


def to_table(result: RunEstimate) -> str:
    """The human report: inputs, the peak phase's parts, the other phases, the verdict."""
    est, s, model, inputs = result.estimate, result.estimate.settings, result.model, result.inputs
    offload = "+".join(name for name, on in (("optimizer", s.offload_optimizer), ("param", s.offload_param)) if on)
    lines = [
        f"model      {result.model_source}: {model.describe()}",
        f"run        {inputs['ds_config']}: recipe {inputs['recipe']}, quant {inputs['quant_preset']}, "
        f"optimizer {s.optimizer}",
        f"setting    {s.world_size} rank(s) on {s.device}, ZeRO-{s.stage}, {s.precision}, teacher "
        f"{s.teacher_precision}{' partitioned' if s.teacher_partitioned else ''}, offload "
        f"{offload or 'none'}, activation checkpointing {'on' if s.activation_checkpointing else 'off'}, "
        f"micro batch {s.micro_batch} × seq {s.seq}, accumulation {s.accumulation}",
        "",
        f"per-rank memory at the peak ({est.peak_phase}):",
    ]
    rows = [(name, human(value), f"{100 * value / est.per_rank_total_bytes:5.1f} %")
            for name, value in _ordered(est.parts) if value]
    rows.append(("total", human(est.per_rank_total_bytes), "100.0 %"))
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    rule = "  " + "-" * (width + vwidth + 12)
    for i, (name, value, share) in enumerate(rows):
        if i == len(rows) - 1:
            lines.append(rule)
        lines.append(f"  {name.ljust(width)}  {value.rjust(vwidth)}  {share}")
    lines.append("")
    lines.append("phases: " + "; ".join(f"{name} {human(total)}" + (" (peak)" if name == est.peak_phase else "")
                                        for name, total in est.phases.items()))
    if result.budget is not None:
        verdict = "fits" if result.fits else "does NOT fit"
        lines.append(f"budget {human(result.budget)} per rank: micro batch {s.micro_batch} {verdict}; largest micro "
                     f"batch that fits: {result.max_micro_batch}")
        if result.recommendations:
            lines.append("to fit micro batch {} (largest micro batch each allows):".format(s.micro_batch))
            for rec in result.recommendations:
                lines.append(f"  - {rec.change}: {rec.max_micro_batch} ({human(rec.per_rank_total_bytes)} at "
                             f"micro batch {rec.settings.micro_batch})")
        elif not result.fits:
            lines.append("nothing considered fits (ZeRO stages, activation checkpointing, offload): more ranks, "
                         "a shorter sequence or a larger device")
    for note in est.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
