"""ZeRO-Offload (issue 15 item 5): the optimizer state (ZeRO 1-3) and ZeRO-3's parameters on the host.

* offload settings DeepSpeed would ignore are refused, naming the key;
* with ``offload_optimizer`` the optimizer is DeepSpeed's ``DeepSpeedCPUAdam`` computing exactly our BertAdam /
  torch's AdamW (its C++ op is JIT-built once into ``TORCH_EXTENSIONS_DIR``, about 40 s on the 2-core machine);
* a short KD-QAT run with LAT under ZeRO-2 + optimizer offload, and under ZeRO-3 + optimizer and parameter
  offload, has the losses of the run without offload, and LAT still reads the optimizer's second moment;
* the ZeRO-3 + offload student is exported from its gathered parameters (no reloading from disk) and the export
  is the trained student: in one rank here, and (slow) in two ranks after an interruption and a resume from the
  checkpoint, where the resumed run also equals an uninterrupted one.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ds_kdqat.config import parse_config
from ds_kdqat.errors import ConfigError
from ds_kdqat.training.optim import BertAdam, build_optimizer
from tests.tiny import REPO, make_task_dir, make_tiny_bert, train_env, write_config

STEPS = 8
# Offloading moves the same fp32 arithmetic to DeepSpeedCPUAdam's vectorised loop: the losses agree to float
# rounding (measured: ≤ 1e-6 relative over 8 steps); 1e-5 relative.
OFFLOAD_TOLERANCE = 1e-5


def _ds(stage: int, **zero) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage, **zero}}


def test_offload_settings_deepspeed_would_ignore_are_refused():
    cpu = {"device": "cpu"}
    assert parse_config(_ds(2, offload_optimizer=cpu)).offload_optimizer
    run = parse_config(_ds(3, offload_optimizer=cpu, offload_param=cpu))
    assert run.offload_optimizer and run.offload_param
    assert not parse_config(_ds(2, offload_optimizer={"device": "none"})).offload_optimizer
    with pytest.raises(ConfigError, match=r"^zero_optimization\.offload_optimizer: .*stage 1, 2 or 3"):
        parse_config(_ds(0, offload_optimizer=cpu))
    with pytest.raises(ConfigError, match=r"^zero_optimization\.offload_param: .*only at zero_optimization\.stage 3"):
        parse_config(_ds(2, offload_param=cpu))
    with pytest.raises(ConfigError, match=r'^zero_optimization\.offload_optimizer\.device: got "gpu"'):
        parse_config(_ds(2, offload_optimizer={"device": "gpu"}))


@pytest.mark.parametrize("name", ["bertadam", "adamw"])
def test_cpu_adam_computes_our_update(name):
    torch.manual_seed(0)
    start = [torch.randn(7, 5), torch.randn(5)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(4)]

    def run(cpu_offload: bool):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        groups = [{"params": [params[0]], "weight_decay": 0.01}, {"params": [params[1]], "weight_decay": 0.0}]
        optimizer = build_optimizer(name, groups, 1e-2, (0.9, 0.999), 1e-6, cpu_offload=cpu_offload)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            optimizer.step()
        return optimizer, params

    reference, want = run(False)
    offloaded, got = run(True)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    assert isinstance(offloaded, DeepSpeedCPUAdam)
    assert isinstance(reference, BertAdam if name == "bertadam" else torch.optim.AdamW)
    # DeepSpeedCPUAdam takes β2 as a float32 (0.999 → 0.99900001), so its 1 − β2 is 1.3e-5 smaller (relative) than
    # the double-precision one torch uses: v differs by that much, the update by half of it (~1e-7 here, the
    # steps being ~0.03), and after 4 steps the weights by ~1e-6
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        torch.testing.assert_close(offloaded.state[a]["exp_avg_sq"], reference.state[b]["exp_avg_sq"], rtol=3e-5,
                                   atol=0)
    with pytest.raises(ValueError, match="adafactor"):
        build_optimizer("adafactor", [{"params": [torch.nn.Parameter(torch.ones(1))]}], 1e-3, (0.9, 0.99), 1e-6,
                        cpu_offload=True)


# -- one rank, in this process ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_rank():
    from tests.tiny import one_rank_group

    with one_rank_group(HF_HUB_OFFLINE="1", TORCH_EXTENSIONS_DIR=os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))):
        yield


def tiny_assets(root: Path) -> tuple[Path, Path]:
    """A tiny BERT without dropout (every run computes the same) and the tiny task."""
    bert = make_tiny_bert(root / "bert")
    config = json.loads((bert / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (bert / "config.json").write_text(json.dumps(config))
    return bert, make_task_dir(root / "task", n_train=64)


def offload_config(root: Path, assets, zero: dict, preset: str = "ternarybert_lat", steps: int = STEPS,
                   save_every: int = 100) -> Path:
    bert, task = assets
    config = write_config(root / "c.json", bert, task, root / "out",
                          model={"teacher": str(bert), "teacher_finetune": "never", "local_files_only": True},
                          quant={"preset": preset}, train={"epochs": 1, "learning_rate": 1e-4, "max_steps": steps},
                          logging={"log_every": 1, "save_every": save_every, "progress": False})
    config.write_text(json.dumps({**json.loads(config.read_text()), "zero_optimization": zero}))
    return config


def kd_losses(out: Path) -> list[float]:
    with open(out / "log.csv", newline="") as handle:
        return [float(r["total"]) for r in csv.DictReader(handle) if r["split"] == "train"]


def kd_stage(config: Path):
    """The KD-QAT stage in this process: (job context, engine, teacher folder)."""
    from ds_kdqat import pipeline
    from ds_kdqat.config import load_config

    ctx = pipeline.prepare(load_config(str(config)))
    try:
        teacher = pipeline.finetune_teacher(ctx)
        engine, _ = pipeline.train_student(ctx, teacher)
    finally:
        ctx.release()
    return ctx, engine, teacher


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def zero2_losses(one_rank, assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("zero2")
    kd_stage(offload_config(root, assets, {"stage": 2}))
    return kd_losses(root / "out")


def _lat_reads_the_optimizer(engine) -> None:
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from ds_kdqat.quant.lat import base_optimizer, lat_quantizers

    assert isinstance(base_optimizer(engine.optimizer), DeepSpeedCPUAdam)
    quantizers = [q for _, q in lat_quantizers(engine.engine.module)]
    assert len(quantizers) == 13 and {q.moment_source for q in quantizers} == {"optimizer"}
    assert all(q.second_moment.dtype == torch.float32 and q.second_moment.sum() > 0 for q in quantizers)


def _assert_losses_match(got: list, want: list) -> None:
    assert len(got) == len(want) == STEPS
    assert all(abs(a - b) <= OFFLOAD_TOLERANCE * abs(b) for a, b in zip(got, want)), (got, want)


def test_zero2_with_optimizer_offload_trains_as_without(zero2_losses, assets, tmp_path):
    _, engine, _ = kd_stage(offload_config(tmp_path, assets, {"stage": 2, "offload_optimizer": {"device": "cpu"}}))
    assert bool(engine.engine.zero_offload_optimizer())
    _assert_losses_match(kd_losses(tmp_path / "out"), zero2_losses)
    _lat_reads_the_optimizer(engine)


def test_zero3_with_full_offload_trains_as_without_and_exports_the_gathered_student(zero2_losses, assets, tmp_path):
    from ds_kdqat import pipeline
    from ds_kdqat.deploy.artifact import export_student
    from ds_kdqat.training.zero import gathered

    zero = {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"},
            "stage3_param_persistence_threshold": 0}
    ctx, engine, teacher = kd_stage(offload_config(tmp_path, assets, zero))
    assert bool(engine.engine.zero_offload_param()) and bool(engine.engine.zero_offload_optimizer())
    _assert_losses_match(kd_losses(tmp_path / "out"), zero2_losses)
    _lat_reads_the_optimizer(engine)
    module = engine.engine.module
    query = module.bert.encoder.layer[0].attention.self.query.weight
    assert query.numel() == 0 and query.ds_numel == 32 * 32  # partitioned: only the shard is held
    assert engine.teacher_partitioned
    report = export_student(engine.engine, tmp_path / "export", task=pipeline._task_description(ctx, module),
                            preprocessing=ctx.tokenizer)
    assert report is not None and query.numel() == 0  # gathered for the export only
    assert_export_is(tmp_path / "export", module, ctx, teacher)
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    with gathered(module):
        # counted once gathered (a partitioned parameter's own numel() is 0): the word embedding alone is 30522 × 32
        assert manifest["model"]["num_parameters"] == sum(p.numel() for p in module.parameters()) > 30522 * 32


def trained_copy(module, ctx, teacher_path: str):
    """A plain (unpartitioned) copy of the ZeRO-3 ``module``, from its gathered parameters: the trained student
    as it is in memory. Collective."""
    import copy

    from ds_kdqat import pipeline
    from ds_kdqat.quant import quantize_model
    from ds_kdqat.quant.lat import lat_state, load_lat_state
    from ds_kdqat.training.zero import gathered

    with gathered(module):
        state = {key: value.detach().clone() for key, value in module.state_dict().items()}
    student = pipeline.load_kd_teacher(ctx, teacher_path)
    quantize_model(student, copy.deepcopy(ctx.run.kdqat.quant))
    student.load_state_dict(state)
    load_lat_state(student, lat_state(module))  # LAT's second moments (full-shaped on every rank)
    return student.eval()


def assert_export_is(folder: Path, module, ctx, teacher_path: str) -> None:
    """The export in ``folder`` is the trained student: the same logits on the dev set's first 16 examples."""
    from ds_kdqat.deploy.load import load_student
    from ds_kdqat.distill.step import model_inputs

    trained = trained_copy(module, ctx, teacher_path)
    exported = load_student(folder, "fakequant")
    dev = ctx.data.dev["dev"]
    batch = model_inputs(dev.collate_fn([dev[i] for i in range(16)]))
    with torch.no_grad():
        want, got = trained(**batch).logits, exported(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert want.std() > 0


# -- two ranks: ZeRO-3 + offload, interrupted, resumed, exported (slow) ------------------------------------------

TWO_RANKS = textwrap.dedent(r"""
    import json, os, signal, sys
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds --local_rank=N
    sys.path.insert(0, args[3])
    import torch
    from ds_kdqat import pipeline
    from ds_kdqat.config import load_config
    from ds_kdqat.deploy.artifact import export_student
    from ds_kdqat.engine import StopTraining, TeacherStudentEngine
    from tests.test_zero_offload import assert_export_is

    config, stop_at, export_dir = args[0], int(args[1]), args[2]
    rank = int(os.environ["RANK"])
    calls = [0]
    step = TeacherStudentEngine.micro_step

    def counted(self, batch, phase):
        terms = step(self, batch, phase)
        calls[0] += 1
        if calls[0] == stop_at and rank == 0:  # SIGTERM on one rank stops every rank at the end of the step
            os.kill(os.getpid(), signal.SIGTERM)
        return terms

    TeacherStudentEngine.micro_step = counted
    ctx = pipeline.prepare(load_config(config))
    try:
        teacher = pipeline.finetune_teacher(ctx)
        try:
            engine, result = pipeline.train_student(ctx, teacher)
        except StopTraining:
            if rank == 0:
                print(f"RESULT {json.dumps({'stopped_after': calls[0]})}", flush=True)
            sys.exit(143)
        module = engine.engine.module
        query = module.bert.encoder.layer[0].attention.self.query.weight
        facts = {"steps_run": calls[0], "steps": result.steps,
                 "offload_param": bool(engine.engine.zero_offload_param()),
                 "offload_optimizer": bool(engine.engine.zero_offload_optimizer()),
                 "partitioned": query.numel() == 0 and query.ds_tensor.numel() == 32 * 32 // 2}
        report = export_student(engine.engine, export_dir, task=pipeline._task_description(ctx, module),
                                preprocessing=ctx.tokenizer)
        facts["report_on_this_rank"] = report is not None
        assert_export_is(__import__("pathlib").Path(export_dir), module, ctx, teacher)  # (collective gather)
        facts["export_is_the_trained_student"] = True
        if rank == 0:
            print(f"RESULT {json.dumps(facts)}", flush=True)
    finally:
        ctx.release()
""")


def _two_ranks(tmp_path: Path, config: Path, stop_at: int, export: Path, port: int) -> tuple[int, dict, str]:
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    command = [deepspeed, "--num_accelerators", "2", "--master_port", str(port), str(script), str(config),
               str(stop_at), str(export), str(REPO)]
    proc = subprocess.run(command, env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    found = [json.JSONDecoder().raw_decode(line.split("RESULT ", 1)[1])[0] for line in proc.stdout.splitlines()
             if "RESULT " in line]
    return proc.returncode, (found[-1] if found else {}), proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.slow
def test_two_ranks_zero3_offload_resume_and_export(tmp_path):
    from ds_kdqat.training.distributed import free_port

    assets = tiny_assets(tmp_path / "assets")
    zero = {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"},
            "stage3_param_persistence_threshold": 0}
    total = 10
    # micro batch 8 × 2 ranks over 64 examples: 4 steps an epoch; max_steps 10 with epochs 3
    steps = {"epochs": 3, "learning_rate": 1e-4, "max_steps": total}

    def config(name: str) -> Path:
        root = tmp_path / name
        root.mkdir()
        path = offload_config(root, assets, zero, preset="ternarybert", steps=total, save_every=2)
        spec = json.loads(path.read_text())
        spec["kdqat"]["train"] = steps
        path.write_text(json.dumps(spec))
        return path

    interrupted, reference = config("interrupted"), config("reference")
    status, facts, log = _two_ranks(tmp_path, interrupted, 5, tmp_path / "unused", free_port())
    assert status != 0 and facts == {"stopped_after": 5}, log
    latest = (interrupted.parent / "out" / "checkpoints" / "kdqat" / "latest").read_text().strip()
    assert latest == "step_00000005", latest  # checkpointed at the end of the step it was stopped in
    status, resumed, log = _two_ranks(tmp_path, interrupted, 0, interrupted.parent / "export", free_port())
    assert status == 0, log
    assert resumed == {"steps_run": total - 5, "steps": total, "offload_param": True, "offload_optimizer": True,
                       "partitioned": True, "report_on_this_rank": True, "export_is_the_trained_student": True}, log
    status, straight, log = _two_ranks(tmp_path, reference, 0, reference.parent / "export", free_port())
    assert status == 0 and straight["steps_run"] == total, log
    # the resumed run is the uninterrupted one: every step's losses, and the exported student
    assert kd_losses(interrupted.parent / "out") == kd_losses(reference.parent / "out")
    for name in ("weights.safetensors", "config.json"):
        assert (interrupted.parent / "export" / name).read_bytes() == (reference.parent / "export" / name).read_bytes()
