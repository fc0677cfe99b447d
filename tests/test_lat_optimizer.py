"""LAT's D from the optimizer's second moment (by hand; under DeepSpeed ZeRO 0 and 2), the fallback to the own
estimate, the embedding's looked-up rows, BertAdam's per-parameter clipping, the w8a8 preset's embedding."""

import logging
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from ds_kdqat.config import parse_config
from ds_kdqat.errors import ConfigError
from ds_kdqat.quant import (
    LatConfig,
    QuantConfig,
    QuantEmbedding,
    QuantLinear,
    WeightQuantizer,
    lat_ternarize,
    quant_config_from_dict,
    quantize_model,
)
from ds_kdqat.quant.lat import after_optimizer_step, prepare_lat
from ds_kdqat.training.optim import BertAdam, build_optimizer

BETA2 = 0.99
X = [torch.tensor([[1.0, 2.0, -1.0]]), torch.tensor([[0.5, -1.0, 3.0]])]
C = [torch.tensor([[1.0, -0.5]]), torch.tensor([[-1.0, 2.0]])]
# the loss (y·c).sum() of y = x·ŵᵀ + b has dL/dŵ = cᵀx, which the straight-through estimator gives the latent weight
GRADS = [c.T @ x for c, x in zip(C, X)]


def lat_linear(lat=None):
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, -0.2, 0.05], [-0.4, 0.3, 0.9]]))
        lin.bias.zero_()
    return QuantLinear.convert(lin, WeightQuantizer("lat", lat=lat or LatConfig()), None)


def train_step(lin, optimizer, k):
    optimizer.zero_grad()
    (lin(X[k]) * C[k]).sum().backward()
    optimizer.step()
    return after_optimizer_step(lin, optimizer=optimizer)


def hand_lat(w: torch.Tensor, v: torch.Tensor, eps=1e-6, iters=10):
    """Loss-aware ternarization of a small matrix in Python floats: D = √v + eps; from TWN's support
    |w| > 0.7·mean|w|, alternate α = Σ D|w| / Σ D over the support and support = {|w| > α/2}."""
    a = [abs(x) for x in w.flatten().tolist()]
    d = [math.sqrt(x) + eps for x in v.flatten().tolist()]

    def alpha_of(support):
        den = sum(di for di, s in zip(d, support) if s)
        return sum(di * ai for di, ai, s in zip(d, a, support) if s) / den if den else 0.0

    support = [x > 0.7 * sum(a) / len(a) for x in a]
    for _ in range(iters):
        alpha = alpha_of(support)
        new = [x > alpha / 2 for x in a]
        if new == support:
            break
        support = new
    alpha = alpha_of(support)
    codes = torch.tensor([math.copysign(1.0, x) if s else 0.0 for x, s in zip(w.flatten().tolist(), support)])
    return alpha, codes.reshape(w.shape)


@pytest.mark.parametrize("make", [lambda p: BertAdam(p, lr=0.05, betas=(0.9, BETA2), eps=1e-6),
                                  lambda p: torch.optim.AdamW(p, lr=0.05, betas=(0.9, BETA2), weight_decay=0.0)],
                         ids=["bertadam", "adamw"])
def test_lat_uses_the_optimizers_second_moment_by_hand(make):
    lin = lat_linear()
    optimizer = make(lin.parameters())
    prepare_lat(lin, optimizer)
    assert lin.weight_quant.moment_source is None  # a fresh optimizer: decided at the first step
    assert train_step(lin, optimizer, 0) == 1
    q = lin.weight_quant
    assert q.moment_source == "optimizer" and q.grad_accum is None and q.lat_folds == 1
    assert q.second_moment is optimizer.state[lin.weight]["exp_avg_sq"]  # the state itself, no copy
    v1 = (1 - BETA2) * GRADS[0] ** 2  # Adam's v after one step, as stored (no bias correction)
    torch.testing.assert_close(q.second_moment, v1)
    for k, v in ((0, v1), (1, BETA2 * v1 + (1 - BETA2) * GRADS[1] ** 2)):
        if k == 1:
            train_step(lin, optimizer, 1)
            torch.testing.assert_close(q.second_moment, v)
        alpha, codes = hand_lat(lin.weight.detach(), v)
        with torch.no_grad():
            used = q(lin.weight)  # what the next forward multiplies with
        torch.testing.assert_close(used, alpha * codes, rtol=1e-6, atol=0)
        assert torch.equal(torch.sign(used), codes)
    # D matters here: with D = 1 (TWN's weighting) the second step's α differs
    assert not math.isclose(alpha, hand_lat(lin.weight.detach(), torch.ones(2, 3))[0], rel_tol=1e-3)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_optimizer_without_second_moment_falls_back_to_the_own_estimate(momentum, caplog, monkeypatch):
    import ds_kdqat.quant.lat as lat_module

    monkeypatch.setattr(lat_module, "_warned", set())  # each reason is logged once per process
    lin = lat_linear(LatConfig(beta2=0.75))
    optimizer = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=momentum)
    prepare_lat(lin, optimizer)
    with caplog.at_level(logging.WARNING, logger="ds_kdqat.quant.lat"):
        assert train_step(lin, optimizer, 0) == 1
    q = lin.weight_quant
    assert q.moment_source == "own"
    torch.testing.assert_close(q.second_moment, 0.25 * GRADS[0] ** 2)  # the first step's gradient was collected
    train_step(lin, optimizer, 1)
    torch.testing.assert_close(q.second_moment, 0.75 * 0.25 * GRADS[0] ** 2 + 0.25 * GRADS[1] ** 2)
    assert any("the optimizer (SGD) keeps no exp_avg_sq" in r.getMessage() for r in caplog.records)


def test_own_setting_keeps_its_own_estimate_with_adam():
    lin = lat_linear(LatConfig(second_moment="own", beta2=0.5))
    assert lin.weight_quant.moment_source == "own"
    optimizer = BertAdam(lin.parameters(), lr=0.05, betas=(0.9, BETA2))
    prepare_lat(lin, optimizer)
    train_step(lin, optimizer, 0)
    torch.testing.assert_close(lin.weight_quant.second_moment, 0.5 * GRADS[0] ** 2)
    assert lin.weight_quant.moment_source == "own"


def test_a_restored_optimizer_settles_the_source_before_the_first_step():
    lin = lat_linear()
    optimizer = BertAdam(lin.parameters(), lr=0.05)
    train_step(lin, optimizer, 0)
    resumed = lat_linear()
    restored = BertAdam(resumed.parameters(), lr=0.05)
    restored.load_state_dict(optimizer.state_dict())
    prepare_lat(resumed, restored)
    assert resumed.weight_quant.moment_source == "optimizer"
    (resumed(X[1]) * C[1]).sum().backward()
    assert resumed.weight_quant.grad_accum is None  # nothing collected in the backward
    train_step(resumed, restored, 1)
    assert resumed.weight_quant.second_moment is restored.state[resumed.weight]["exp_avg_sq"]


def test_embedding_looks_up_rows_of_the_optimizers_second_moment():
    torch.manual_seed(0)
    emb = QuantEmbedding.convert(nn.Embedding(12, 5, padding_idx=0), WeightQuantizer("lat", granularity="row"))
    twin = QuantEmbedding.convert(nn.Embedding(12, 5, padding_idx=0), WeightQuantizer("lat", granularity="row"))
    twin.weight.data.copy_(emb.weight.data)
    ids = torch.tensor([[3, 7, 3, 0], [11, 1, 0, 0]])
    v = torch.rand(12, 5) ** 4
    emb.weight_quant.use_optimizer_moment(v)
    twin.weight_quant.second_moment = v  # the own estimate: the whole table is quantized, the gradient collected
    assert emb.weight_quant.quantizes_rows and not twin.weight_quant.quantizes_rows
    out, ref = emb(ids), twin(ids)
    assert torch.equal(out, F.embedding(ids, lat_ternarize(emb.weight.detach(), v, "row"), padding_idx=0))
    assert torch.equal(out, ref)
    grad = torch.randn(out.shape)
    out.backward(grad)
    ref.backward(grad)
    assert torch.equal(emb.weight.grad, twin.weight.grad)  # padding row included (zero)
    assert emb.weight_quant.grad_accum is None and twin.weight_quant.grad_accum is not None


def test_bertadam_clips_each_parameter_on_its_own():
    big, small = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    big.grad, small.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4])  # norms 5 and 0.5
    optimizer = BertAdam([big, small], lr=0.1, betas=(0.9, 0.99), eps=1e-6, max_grad_norm=1.0)
    optimizer.step()
    clipped = torch.tensor([3.0, 4.0]) / (5 + 1e-6)  # clip_grad_norm_(big, 1.0); the global norm is not used
    torch.testing.assert_close(optimizer.state[big]["exp_avg_sq"], 0.01 * clipped ** 2)
    torch.testing.assert_close(optimizer.state[small]["exp_avg_sq"], 0.01 * torch.tensor([0.09, 0.16]))
    m, v = 0.1 * clipped, 0.01 * clipped ** 2
    torch.testing.assert_close(big.data, -0.1 * m / (v.sqrt() + 1e-6))
    unclipped = BertAdam([nn.Parameter(torch.zeros(2))], lr=0.1)
    unclipped.param_groups[0]["params"][0].grad = torch.tensor([3.0, 4.0])
    unclipped.step()
    assert torch.equal(unclipped.param_groups[0]["params"][0].grad, torch.tensor([3.0, 4.0]))  # default: off
    with pytest.raises(ValueError, match="max_grad_norm"):
        BertAdam([big], max_grad_norm=-1.0)
    with pytest.raises(ValueError, match="BertAdam"):
        build_optimizer("adamw", [{"params": [big]}], 0.1, (0.9, 0.999), 1e-6, bertadam_max_grad_norm=1.0)
    built = build_optimizer("bertadam", [{"params": [big]}], 0.1, (0.9, 0.999), 1e-6, bertadam_max_grad_norm=2.0)
    assert built.param_groups[0]["max_grad_norm"] == 2.0


BASE = {"train_micro_batch_size_per_gpu": 4}


@pytest.mark.parametrize("data, path, message", [
    ({**BASE, "kdqat": {"quant": {"lat": {"second_moment": "adam"}}}}, "kdqat.quant.lat.second_moment",
     'got "adam"; allowed: "optimizer", "own"'),
    ({**BASE, "kdqat": {"train": {"bertadam_max_grad_norm": -1}}}, "kdqat.train.bertadam_max_grad_norm",
     "must be >= 0"),
    ({**BASE, "kdqat": {"finetune": {"optimizer": "adamw", "bertadam_max_grad_norm": 1.0}}},
     "kdqat.finetune.bertadam_max_grad_norm", "per-parameter clipping is BertAdam's"),
    ({**BASE, "zero_optimization": {"stage": 2}, "kdqat": {"train": {"bertadam_max_grad_norm": 1.0}}},
     "kdqat.train.bertadam_max_grad_norm", "ZeRO stages 1-3"),
])
def test_config_errors(data, path, message):
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.path == path and message in str(info.value)


def test_config_defaults_and_accepted_values():
    run = parse_config({**BASE, "kdqat": {"train": {"bertadam_max_grad_norm": 1.0},
                                          "quant": {"lat": {"second_moment": "own"}}}})
    assert run.kdqat.train.bertadam_max_grad_norm == 1.0 and run.kdqat.finetune.bertadam_max_grad_norm == 0.0
    assert run.kdqat.quant.lat.second_moment == "own"
    assert quant_config_from_dict({}).lat.second_moment == "optimizer"


def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def test_w8a8_quantizes_the_word_embedding_layer_wise():
    model = tiny_bert()
    report = quantize_model(model, QuantConfig(preset="w8a8"))
    embedding = model.bert.embeddings.word_embeddings
    assert embedding.weight_quant.granularity == "layer"
    assert report.of_kind("embedding")[0].quantizer == "uniform-symmetric 8-bit layer-wise"
    parts = embedding.weight_quant.parts(embedding.weight)
    assert parts.scale.shape == ()  # one scale for the whole table
    assert all(m.weight_quant.granularity == "layer" for m in model.modules() if isinstance(m, QuantLinear))
    # row-wise stays available through explicit groups
    model = tiny_bert()
    quantize_model(model, quant_config_from_dict({"preset": "w8a8", "groups": [
        {"roles": ["query", "key", "value", "attention_output_projection", "ffn_in", "ffn_out"],
         "method": "uniform", "bits": 8},
        {"roles": ["word_embedding"], "method": "uniform", "bits": 8, "granularity": "row", "act_bits": None}]}))
    embedding = model.bert.embeddings.word_embeddings
    assert embedding.weight_quant.parts(embedding.weight).scale.shape == (64, 1)


# ------------------------------------------------------------------------------------------------------------
# under DeepSpeed (one CPU rank, in a child process: DeepSpeed keeps its process groups in module globals, so
# engines of several test modules in one pytest process would share stale groups)

DEEPSPEED_SCRIPT = r"""
import sys, torch, deepspeed
import torch.nn.functional as F
from deepspeed.utils import safe_get_full_optimizer_state
from ds_kdqat.quant import QuantConfig, lat_ternarize, quantize_model
from ds_kdqat.quant.lat import lat_weights
from ds_kdqat.training.callbacks import LatFold, LoopState
from ds_kdqat.training.optim import BertAdam
from tests.test_lat_optimizer import tiny_bert

for stage in map(int, sys.argv[1:]):
    model = tiny_bert()
    quantize_model(model, QuantConfig(preset="ternarybert_lat"))
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=BertAdam(model.parameters(), lr=1e-3),
        config={"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "steps_per_print": 10 ** 6,
                "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
                "zero_allow_untested_optimizer": True})
    fold, state = LatFold(engine), LoopState(micro=0, step=0, total_steps=3)
    fold.on_train_begin(state)
    g = torch.Generator().manual_seed(0)
    for micro in range(6):
        ids = torch.randint(1, 64, (2, 8), generator=g)
        engine.backward(engine(input_ids=ids, labels=torch.tensor([0, 1])).loss)
        engine.step()
        if micro % 2 == 1:
            state.step += 1
            fold.on_step_end(state)
    weights = lat_weights(engine.module)
    assert len(weights) == 13, len(weights)  # 12 encoder linears and the word embedding
    for name, param, q in weights:
        if stage == 0:  # the optimizer's state tensor itself
            v = engine.optimizer.state[param]["exp_avg_sq"]
            assert q.second_moment is v, name
        else:  # its partitions, gathered
            v = safe_get_full_optimizer_state(param, "exp_avg_sq")
            assert torch.equal(q.second_moment, v), name
        assert q.moment_source == "optimizer" and q.lat_folds == 3 and q.grad_accum is None, name
        full_shape = param.ds_shape if stage == 3 else param.shape
        assert q.second_moment.shape == v.shape == full_shape, name
        with torch.no_grad(), deepspeed.zero.GatheredParameters([param], enabled=stage == 3):
            weight = param.detach().clone()  # the D the forward uses is that v's:
            if name.endswith("word_embeddings"):  # looked-up rows of the table's LAT
                ids = torch.tensor([1, 5, 63, 5])
                expected = F.embedding(ids, lat_ternarize(weight, v, "row"))
                assert torch.equal(q(weight[ids], rows=ids), expected), name
            else:
                assert torch.equal(q(weight), lat_ternarize(weight, v)), name
    if stage == 3:
        assert weights[1][1].numel() == 0  # really partitioned outside the forward
    print("OK", stage, flush=True)
"""


def test_under_deepspeed_d_is_the_optimizers_exp_avg_sq(tmp_path):
    """ZeRO stage 0: D's v is the optimizer's state tensor; 2: its fragment of the flat partition, gathered;
    3: the partitioned state, gathered (parameters partitioned too)."""
    import subprocess
    import sys

    from ds_kdqat.training.distributed import free_port
    from tests.tiny import REPO

    script = tmp_path / "lat_zero.py"
    script.write_text(DEEPSPEED_SCRIPT)
    env = dict(os.environ, DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    proc = subprocess.run([sys.executable, str(script), "0", "2", "3"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
    done = [line for line in proc.stdout.splitlines() if line.startswith("OK ")]
    assert proc.returncode == 0 and done == ["OK 0", "OK 2", "OK 3"], proc.stdout[-3000:] + proc.stderr[-5000:]


# ------------------------------------------------------------------------------------------------------------
# the main job with a LAT student (launches real runs)


@pytest.mark.slow
def test_lat_job_reads_the_optimizer_and_resumes_exactly(tmp_path):
    import json
    import signal
    import subprocess
    import sys
    import time

    from tests.tiny import REPO, make_task_dir, make_tiny_bert, run_train, train_env, write_config

    model, data = make_tiny_bert(tmp_path / "bert"), make_task_dir(tmp_path / "task")
    quant = {"preset": "ternarybert_lat"}
    reference = write_config(tmp_path / "ref.json", model, data, tmp_path / "ref", quant=quant)
    run_train(reference)
    # every LAT second moment the checkpoint saved is an exp_avg_sq of the optimizer state saved with it
    folder = tmp_path / "ref" / "checkpoints" / "kdqat"
    step = folder / (folder / "latest").read_text().strip()
    moments = torch.load(step / "kdqat_tensors.pt", weights_only=False)
    states = torch.load(step / "mp_rank_00_model_states.pt", weights_only=False)["optimizer"]["state"].values()
    assert len(moments) == 2 * 6 + 1
    for key, v in moments.items():
        assert any(s["exp_avg_sq"].shape == v.shape and torch.equal(s["exp_avg_sq"], v) for s in states), key

    config = write_config(tmp_path / "c.json", model, data, tmp_path / "out", quant=quant)
    process = subprocess.Popen([sys.executable, str(REPO / "run" / "train.py"), "--ds_config", str(config)],
                               env=train_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    latest = tmp_path / "out" / "checkpoints" / "kdqat" / "latest"
    deadline = time.time() + 600
    while not (latest.exists() and int(latest.read_text().split("_")[1]) >= 4):
        assert process.poll() is None and time.time() < deadline, "no KD-QAT checkpoint in time"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # checkpoints and exits 143; the rerun resumes mid KD-QAT
    assert process.wait(timeout=300) == 143, process.stderr.read()[-3000:]
    run_train(config)

    def losses(out):
        import csv

        with open(out / "log.csv", newline="") as handle:
            return [(row["step"], row["total"]) for row in csv.DictReader(handle)
                    if row["phase"].startswith("kdqat") and row["split"] == "train"]

    assert json.loads((tmp_path / "out" / "results.json").read_text())["student"] == \
        json.loads((tmp_path / "ref" / "results.json").read_text())["student"]
    assert losses(tmp_path / "out") == losses(tmp_path / "ref")
