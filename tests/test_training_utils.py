"""Optimizer, learning-rate schedule, data order and run log: values computed by hand."""

import math

import pytest
import torch

from ds_kdqat.errors import DataError
from ds_kdqat.training.logger import RunLog, read_log_table
from ds_kdqat.training.optim import BertAdam, build_optimizer, linear_warmup_decay, parameter_groups
from ds_kdqat.training.order import epoch_micro_batches, micro_batches_per_epoch
from ds_kdqat.training.zero import gathered, is_partitioned


def test_bert_adam_has_no_bias_correction_and_decoupled_decay():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = BertAdam([w], lr=0.1, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.5)
    w.grad = torch.tensor([0.2, 0.4])
    opt.step()
    # m = 0.1 g, v = 0.01 g², update = m/(√v+eps) + wd·w = g·0.1/(0.1|g| + eps) + 0.5·w
    expected = []
    for w0, g in ((1.0, 0.2), (-2.0, 0.4)):
        m, v = 0.1 * g, 0.01 * g * g
        expected.append(w0 - 0.1 * (m / (math.sqrt(v) + 1e-6) + 0.5 * w0))
    torch.testing.assert_close(w.detach(), torch.tensor(expected))
    w.grad = torch.tensor([0.0, 0.0])
    before = w.detach().clone()
    opt.step()  # second step: m = 0.09 g1, v = 0.0099 g1²
    g1 = torch.tensor([0.2, 0.4])
    update = 0.09 * g1 / ((0.0099 * g1 * g1).sqrt() + 1e-6) + 0.5 * before
    torch.testing.assert_close(w.detach(), before - 0.1 * update)


def test_no_decay_for_biases_and_layernorm():
    model = torch.nn.ModuleDict({"dense": torch.nn.Linear(2, 2), "LayerNorm": torch.nn.LayerNorm(2)})
    groups = parameter_groups(model, 0.01)
    assert [len(g["params"]) for g in groups] == [1, 3]
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    for name in ("bertadam", "adamw", "adafactor"):
        assert build_optimizer(name, parameter_groups(model, 0.01), 1e-3, (0.9, 0.999), 1e-6)


def _factors(total, warmup, segments=None):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = linear_warmup_decay(opt, total, warmup, segments)
    values = []
    for _ in range(total):
        values.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return values


def test_linear_warmup_then_decay():
    # T = 10, W = ceil(0.2·10) = 2: 0, 1/2, then (10 − s)/8
    assert _factors(10, 0.2) == pytest.approx([0, 0.5, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])


def test_segments_restart_the_schedule():
    values = _factors(8, 0.25, [(0, 4), (4, 8)])
    # each segment of 4: W = 1 → 0, then (4 − t)/3
    assert values == pytest.approx([0, 1.0, 2 / 3, 1 / 3, 0, 1.0, 2 / 3, 1 / 3])


def test_order_is_a_sharded_permutation_and_resumable():
    n, micro, world = 23, 3, 2
    assert micro_batches_per_epoch(n, micro, world) == 3
    ranks = [list(epoch_micro_batches(n, micro, r, world, seed=5, epoch=1)) for r in range(world)]
    one_rank = list(epoch_micro_batches(n, micro * world, 0, 1, seed=5, epoch=1))
    for step in range(3):  # one rank with a double micro batch sees what both ranks see together
        assert ranks[0][step] + ranks[1][step] == one_rank[step]
    seen = [i for batch in one_rank for i in batch]
    assert len(set(seen)) == 18 and all(0 <= i < n for i in seen)
    assert list(epoch_micro_batches(n, micro, 1, world, 5, 1, start=2)) == ranks[1][2:]
    assert one_rank != list(epoch_micro_batches(n, micro * world, 0, 1, seed=5, epoch=2))


def test_run_log_rewrites_atomically_and_truncates_on_resume(tmp_path):
    path = tmp_path / "log.csv"
    log = RunLog(str(path), enabled=True)
    log.write(1, "kdqat:kd", "train", {"total": 1.5})
    log.write(2, "kdqat:kd", "train", {"total": 1.25, "pred": 0.5})
    log.write(2, "kdqat:kd", "dev", {"accuracy": 0.75})
    assert path.read_text().splitlines() == [
        "step,phase,split,total,pred,accuracy", "1,kdqat:kd,train,1.5,,", "2,kdqat:kd,train,1.25,0.5,",
        "2,kdqat:kd,dev,,,0.75"]
    resumed = RunLog(str(path), enabled=True)
    resumed.truncate(("kdqat",), 1)
    assert path.read_text().splitlines() == ["step,phase,split,total,pred,accuracy", "1,kdqat:kd,train,1.5,,"]


def test_zero3_partitioned_only_with_ds_id():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    assert not is_partitioned(model) and not is_partitioned(model.parameters()) and not is_partitioned(model[0].weight)
    with gathered(model) as inside:  # a plain model: nullcontext, deepspeed not needed
        assert inside is None
    fake = torch.nn.Parameter(torch.zeros(0))
    fake.ds_id = 7  # what deepspeed.zero puts on a partitioned parameter
    assert is_partitioned(fake) and is_partitioned([model[0].weight, fake])
    model[1].register_parameter("sharded", fake)
    assert is_partitioned(model)


def test_run_log_schema_is_checked_when_read_back(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("step,phase,split,total\n1,a,train,0.5\n")
    assert read_log_table(path) == (["step", "phase", "split", "total"], [{"step": "1", "phase": "a", "split": "train",
                                                                          "total": "0.5"}])
    for text, where in (("epoch,loss\n1,0.5\n", "log.csv:1: missing column"), ("step,phase,split,t\nx,a,b,1\n", "log.csv:2: step"),
                        ("step,phase,split,t\n1,a,b,y\n", "log.csv:2: t is 'y'"), ("step,phase,split\n1,a,b,c\n", "log.csv:2: more cells")):
        path.write_text(text)
        with pytest.raises(DataError, match=where):
            read_log_table(path)
        with pytest.raises(DataError, match=r"log.csv: not a ds-kdqat run log \(.*\); it is left as it is"):
            RunLog(str(path), enabled=True)
        assert path.read_text() == text
