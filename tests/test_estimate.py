"""The memory estimator (``ds-kdqat estimate``): exact counts, the ZeRO arithmetic, the traced activations and
taps, the largest micro batch, the JSON and the command's exit statuses. Tiny shapes only; the comparison with
real runs is bench/bench_memory.py."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from ds_kdqat import cli
from ds_kdqat.config import parse_config
from ds_kdqat.configtools import from_dict
from ds_kdqat.distill.config import DistillConfig
from ds_kdqat.errors import ConfigError
from ds_kdqat.estimate import (ShapeFlags, config_from_shape, estimate_memory, estimate_run, fit_activations,
                               largest_micro_batch, model_shape, parse_size, settings_from_run)
from ds_kdqat.estimate.memory import CPU_PROCESS_OVERHEAD, CUDA_CONTEXT, Settings
from ds_kdqat.estimate.shape import build_task_model
from ds_kdqat.estimate.trace import _measure, _proxy_config
from ds_kdqat.quant.config import QuantConfig

L, D, H, F, V, S = 2, 32, 4, 64, 100, 16
FLAGS = ShapeFlags(L, D, H, F, V)


def ds_config(stage: int = 0, micro: int = 4, **extra) -> dict:
    return {"train_micro_batch_size_per_gpu": micro, "zero_optimization": {"stage": stage}, **extra,
            "kdqat": {"data": {"task": "rt_polarity", "max_seq_length": S}}}


def quant(preset: str = "ternarybert") -> QuantConfig:
    return from_dict(QuantConfig, {"preset": preset}, "kdqat.quant")


def distill(**section) -> DistillConfig:
    return from_dict(DistillConfig, section or {"recipe": "ternarybert"}, "kdqat.distill")


@pytest.fixture(scope="module")
def shape():
    return model_shape(config_from_shape(FLAGS, S), S, quant(), world_size=2)


@pytest.fixture(scope="module")
def acts(shape):
    return fit_activations(shape.config, shape.family, shape.pixels, S, distill(), quant())


def test_parameter_counts_are_the_real_models(shape):
    torch.manual_seed(0)
    real = build_task_model(shape.config)
    assert shape.params == sum(p.numel() for p in real.parameters())
    linears = 4 * D * D + 2 * D * F  # Q, K, V, O, FFN in, FFN out per layer
    assert shape.quantized == L * linears + V * D  # + the word embedding (row-wise ternary)
    sizes = [p.numel() for p in real.parameters()]
    assert shape.largest == max(sizes) == 512 * D and shape.lat == 0  # the position table
    assert shape.partition_numel == sum(-(-n // 2) for n in sizes)
    lat = model_shape(shape.config, S, quant("ternarybert_lat"))
    assert lat.lat == lat.quantized == shape.quantized


def test_zero_arithmetic_per_stage(shape, acts):
    P, share = shape.params, shape.partition_numel
    base = Settings(world_size=2, device="cuda", micro_batch=4, seq=S)
    zero0 = estimate_memory(shape, acts, base).components["forward/backward"]
    assert zero0["student weights"] == 4 * P and zero0["optimizer states"] == 8 * P
    assert zero0["teacher weights"] == 4 * P and zero0["fixed overhead"] == CUDA_CONTEXT + 256 * 2**20
    assert "fp32 master weights" not in zero0 or zero0["fp32 master weights"] == 0
    for stage in (1, 2, 3):
        parts = estimate_memory(shape, acts, replace(base, stage=stage)).components["optimizer step"]
        assert parts["optimizer states"] == 8 * share  # Adam's two fp32 moments, partitioned
        assert parts["fp32 master weights"] == 4 * share  # DeepSpeed's fp32 partition (a clone even in fp32)
    zero3 = estimate_memory(shape, acts, replace(base, stage=3)).components["end of run"]
    assert zero3["student weights"] == 4 * (share + shape.persistent)
    assert zero3["teacher weights"] == 4 * (share + shape.persistent)  # partitioned like the student
    bf16 = estimate_memory(shape, acts, replace(base, stage=3, precision="bf16")).components["end of run"]
    assert bf16["student weights"] == 2 * (share + shape.persistent) and bf16["fp32 master weights"] == 4 * share
    kept = estimate_memory(shape, acts, replace(base, stage=3, partition_teacher=False)).components["end of run"]
    assert kept["teacher weights"] == 4 * P  # replicated, and never cast
    mixed0 = estimate_memory(shape, acts, replace(base, precision="bf16")).components["end of run"]
    assert mixed0["student weights"] == 2 * P and mixed0["fp32 master weights"] == 4 * P
    offload = estimate_memory(shape, acts, replace(base, stage=3, offload_optimizer=True, offload_param=True))
    parts = offload.components["end of run"]
    assert parts["optimizer states"] == parts["fp32 master weights"] == 0
    assert parts["student weights"] == 4 * shape.persistent


def test_teacher_weights_by_teacher_precision(shape, acts):
    """kdqat.model.teacher_precision: fp32 4 bytes a parameter (also in a bf16 run, also partitioned), bf16 2,
    int8_dynamic 1 per nn.Linear weight element and 4 for the rest (biases, embeddings, LayerNorms)."""
    P, share = shape.params, shape.partition_numel
    # the tiny BERT's nn.Linear weights: Q, K, V, O, FFN in and out per layer, the pooler (D x D), the classifier
    assert shape.linear == L * (4 * D * D + 2 * D * F) + D * D + D * 2
    base = Settings(world_size=2, device="cuda", micro_batch=4, seq=S)

    def teacher(**change) -> int:
        return estimate_memory(shape, acts, replace(base, **change)).components["end of run"]["teacher weights"]

    assert teacher() == teacher(precision="bf16") == 4 * P
    assert teacher(teacher_precision="bf16") == teacher(teacher_precision="bf16", precision="bf16") == 2 * P
    assert teacher(teacher_precision="int8_dynamic") == shape.linear + 4 * (P - shape.linear)
    assert teacher(stage=3, precision="bf16") == 4 * (share + shape.persistent)  # partitioned, still fp32
    assert teacher(stage=3, teacher_precision="bf16") == 2 * (share + shape.persistent)
    assert teacher(stage=3, teacher_precision="bf16", offload_param=True) == 2 * shape.persistent
    assert replace(base, teacher_precision="int8_dynamic").teacher_dtype == "float32"  # its linears return fp32


def test_cpu_has_the_process_overhead_and_no_gpu_allowances(shape, acts):
    settings = Settings(world_size=1, device="cpu", micro_batch=4, seq=S)
    est = estimate_memory(shape, acts, settings)
    assert est.parts["fixed overhead"] == CPU_PROCESS_OVERHEAD
    assert "allocator slack" not in est.parts and "saving" in est.phases
    assert sum(est.parts.values()) == est.per_rank_total_bytes == max(est.phases.values())


def test_attention_score_taps_are_B_H_S2_floats_per_layer(shape):
    def taps(terms):
        model = fit_activations(shape.config, shape.family, shape.pixels, S, distill(recipe="custom", terms=terms),
                                quant())
        return model.phases[0].taps_per_example

    added = taps(["pred", "attention_score"]) - taps(["pred"])
    # per layer and example: the teacher's scores, the student's (softmax keeps its output, not its input) and the
    # MSE's saved difference, H·S² fp32 each, plus the (query, key) padding mask S² bool
    assert added == pytest.approx(L * (3 * H * S * S * 4 + S * S))


def test_the_activation_fit_extrapolates_exactly(shape, acts):
    from ds_kdqat.distill.phases import kd_phases
    from ds_kdqat.models.families import adapter_for_config

    d, f, batch = 5, 7, 3
    proxy = _proxy_config(shape.config, "bert", d, f)

    def phases_of(model):
        return list(kd_phases(distill(), 1000, len(adapter_for_config(proxy).layer_modules(model)),
                              "classification")[0])

    with torch.random.fork_rng():
        measured = _measure(proxy, "bert", False, S, (batch,), phases_of, quant(), "classification", 2,
                            torch.float32, torch.float32)[batch]["kd"]
    far = fit_activations(proxy, "bert", False, S, distill(), quant())
    phase = far.phases[0]
    assert phase.saved_per_example * batch + phase.saved_fixed == pytest.approx(measured[0], rel=1e-9)
    assert phase.taps_per_example * batch + phase.taps_fixed == pytest.approx(measured[1], rel=1e-9)
    # the quantizers' outputs are kept as int8 codes: at their float size the saved tensors are larger
    assert phase.saved_float_per_example * batch + phase.saved_float_fixed == pytest.approx(measured[3], rel=1e-9)
    assert measured[3] > 1.5 * measured[0]


def test_activation_checkpointing_keeps_less(shape, acts):
    settings = Settings(micro_batch=64, seq=S)
    off = estimate_memory(shape, acts, settings).components["forward/backward"]
    on = estimate_memory(shape, acts, replace(settings, activation_checkpointing=True)).components["forward/backward"]
    assert on["activations"] < off["activations"]
    assert on["activations"] >= L * 64 * S * D * 4  # every layer's input is kept


def test_activation_checkpointing_arithmetic_includes_ti_phases(shape):
    """Hand-computed: with checkpointing the forward/backward phase keeps every layer's input, one layer's share of
    the saved activations and quantized copies, and all taps; Teacher-Intervention phases are checkpointed too
    (their recomputation replays the teacher's tensors, see ds_kdqat.models.checkpointing)."""
    from ds_kdqat.estimate.trace import ActivationModel, PhaseMemory

    kd = PhaseMemory("kd", saved_per_example=8e6, saved_fixed=4e6, taps_per_example=1e6, taps_fixed=0.0,
                     taps_all_per_example=3e6, taps_all_fixed=2e4)
    ti = PhaseMemory("ti_map", saved_per_example=9e6, saved_fixed=4e6, taps_per_example=2e6, taps_fixed=0.0,
                     taps_all_per_example=5e6, taps_all_fixed=2e4, saved_float_per_example=1e7,
                     saved_float_fixed=0.0)
    batch = 4
    settings = Settings(micro_batch=batch, seq=S, activation_checkpointing=True)
    estimate = estimate_memory(shape, ActivationModel((kd, ti)), settings)
    parts = estimate.components["forward/backward"]
    # the TI phase is the larger one: its checkpointed figures are taken; the recomputed layer saves floats
    assert parts["activations"] == L * batch * S * D * 4 + 1e7 * batch / L
    assert parts["quantized weight copies"] == 4e6 / L
    assert parts["taps"] == 5e6 * batch + 2e4
    assert not any("Intervention" in note for note in estimate.notes)
    off = estimate_memory(shape, ActivationModel((kd, ti)), replace(settings, activation_checkpointing=False))
    assert off.components["forward/backward"]["activations"] == 9e6 * batch


def test_backward_workspace_counts_rebuilt_floats(shape):
    """The backward rebuilds a layer's operands kept as int8 codes: its workspace is one layer's saved tensors
    at float size, per example and fixed (the weights); a model without codes falls back to the saved bytes."""
    from ds_kdqat.estimate.memory import _backward_workspace
    from ds_kdqat.estimate.trace import ActivationModel, PhaseMemory

    coded = PhaseMemory("kd", 8e6, 4e6, 1e6, 0.0, 3e6, 2e4, saved_float_per_example=2e7, saved_float_fixed=1.6e7)
    assert _backward_workspace(coded, shape, 4) == (2e7 * 4 + 1.6e7) / L
    plain = PhaseMemory("kd", 8e6, 4e6, 1e6, 0.0, 3e6, 2e4)
    assert _backward_workspace(plain, shape, 4) == (8e6 * 4 + 4e6) / L
    # without checkpointing the peak is the backward's start: the forward's end (the taps' gradients wait for their
    # layers) + that workspace (measured: bench/bench_checkpointing.py)
    parts = estimate_memory(shape, ActivationModel((coded,)), Settings(micro_batch=4, seq=S)).components
    step = parts["forward/backward"]
    assert (step["activations"], step["quantized weight copies"], step["taps"]) == (8e6 * 4, 4e6, 1e6 * 4)
    assert step["backward workspace"] == (2e7 * 4 + 1.6e7) / L


def test_largest_micro_batch(shape, acts):
    settings = Settings(micro_batch=1, seq=S)
    at = {b: estimate_memory(shape, acts, settings, b).per_rank_total_bytes for b in (6, 7, 8)}
    assert at[6] < at[7] < at[8]
    assert largest_micro_batch(shape, acts, settings, at[7]) == 7
    assert largest_micro_batch(shape, acts, settings, at[7] - 1) == 6
    assert largest_micro_batch(shape, acts, settings, 1000) == 0


def test_settings_from_the_ds_config():
    run = parse_config(ds_config(3, 8, bf16={"enabled": True}), ["zero_optimization.offload_optimizer.device=cpu",
                                                                 "zero_optimization.reduce_bucket_size=1000"])
    s = settings_from_run(run, 4, "cuda")
    assert (s.stage, s.precision, s.micro_batch, s.world_size, s.seq) == (3, "bf16", 8, 4, S)
    assert s.offload_optimizer and not s.offload_param and s.overlap_comm and s.reduce_bucket_size == 1000
    assert s.teacher_precision == "fp32" and s.teacher_dtype == "float32"  # not cast: the run's bf16 is the student's
    cheap = settings_from_run(parse_config(ds_config(3, 8), ["kdqat.model.teacher_precision=bf16"]), 4, "cuda")
    assert cheap.teacher_precision == "bf16" and cheap.teacher_dtype == "bfloat16"
    with pytest.raises(ConfigError, match="zero_optimization.offload_param"):
        settings_from_run(parse_config(ds_config(2), ["zero_optimization.offload_param.device=cpu"]), 1, "cuda")


@pytest.mark.parametrize("text, value", [("48GiB", 48 * 2**30), ("80GB", 80 * 10**9), ("1.5G", int(1.5 * 2**30)),
                                         ("24000MiB", 24000 * 2**20), ("1024", 1024)])
def test_sizes(text, value):
    assert parse_size(text) == value


def test_bad_size_names_the_flag():
    with pytest.raises(ConfigError, match="^--gpu_memory: "):
        parse_size("48 apples")


def test_estimate_run_recommends_when_it_does_not_fit(tmp_path):
    run = parse_config(ds_config(0, 64), ["zero_optimization.reduce_bucket_size=100000"])
    fits = estimate_run(run, world_size=2, device="cuda", shape_flags=FLAGS)
    total = fits.estimate.per_rank_total_bytes
    tight = estimate_run(run, world_size=2, device="cuda", gpu_memory=total - 1, shape_flags=FLAGS)
    assert tight.fits is False and 1 <= tight.max_micro_batch < 64
    assert tight.recommendations and all(r.max_micro_batch >= 1 for r in tight.recommendations)
    assert any("stage" in r.change for r in tight.recommendations)


def _write(tmp_path, **kw) -> str:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(ds_config(**kw)))
    return str(path)


SHAPE_ARGS = ["--layers", str(L), "--hidden", str(D), "--heads", str(H), "--ffn", str(F), "--vocab", str(V)]


def test_cli_json(tmp_path, capsys):
    status = cli.main(["estimate", "--ds_config", _write(tmp_path, stage=2), *SHAPE_ARGS, "--world_size", "2",
                       "--gpu_memory", "2GiB", "--device", "cpu", "--json"])
    assert status == 0
    out = json.loads(capsys.readouterr().out)
    assert out["per_rank_total_bytes"] == sum(out["parts"].values())
    assert {"student weights", "optimizer states", "teacher weights", "fixed overhead"} <= set(out["parts"])
    assert "activations" in out["components"]["forward/backward"]
    assert set(out["phases"]) == {"forward/backward", "optimizer step", "saving", "end of run"}
    assert out["phases"][out["peak_phase"]] == out["per_rank_total_bytes"]
    assert "taps" in out["components"]["forward/backward"] or "backward workspace" in out["components"][
        "forward/backward"]
    assert all(isinstance(v, int) for v in out["parts"].values())
    assert out["inputs"]["world_size"] == 2 and out["inputs"]["zero_stage"] == 2
    assert out["inputs"]["device"] == "cpu" and out["inputs"]["gpu_memory_bytes"] == 2 * 2**30
    assert out["max_micro_batch"] >= 4 and out["fits"] is True and out["model"]["parameters"] > 0


def test_cli_table_and_shim(tmp_path, capsys):
    from run.estimate import main  # the run/ shim

    assert main(["--ds_config", _write(tmp_path), *SHAPE_ARGS, "--gpu_memory", "80GB"]) == 0
    text = capsys.readouterr().out
    assert "per-rank memory at the peak" in text and "largest micro batch that fits" in text


@pytest.mark.parametrize("argv, key", [
    (["--gpu_memory", "lots"], "--gpu_memory"),
    (["--world_size", "0"], "--world_size"),
    (["--seq", "1"], "--seq"),
])
def test_cli_bad_values_exit_2_naming_the_flag(tmp_path, capsys, argv, key):
    assert cli.main(["estimate", "--ds_config", _write(tmp_path), *SHAPE_ARGS, *argv]) == 2
    assert capsys.readouterr().err.startswith(f"ds-kdqat config error: {key}: ")


def test_cli_missing_shape_flag_and_bad_config_key(tmp_path, capsys):
    assert cli.main(["estimate", "--ds_config", _write(tmp_path), "--layers", "2", "--hidden", "32"]) == 2
    assert capsys.readouterr().err.startswith("ds-kdqat config error: --heads: ")
    assert cli.main(["estimate", "--ds_config", _write(tmp_path), *SHAPE_ARGS, "--set",
                     "zero_optimization.stage=5"]) == 2
    assert capsys.readouterr().err.startswith("ds-kdqat config error: zero_optimization.stage: ")


def test_cli_unknown_flag_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as stop:
        cli.main(["estimate", "--ds_config", _write(tmp_path), "--gpus", "8"])
    assert stop.value.code == 2
