"""LAT under data parallelism: two gloo ranks average the gradient; DeepSpeed ZeRO 0-3 (slow: starts DeepSpeed)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(r"""
    import json, sys, torch, deepspeed
    from transformers import BertConfig, BertForSequenceClassification
    from ds_kdqat.quant import quantize_model, after_optimizer_step, quantized_weights
    from ds_kdqat.quant.modules import QuantLinear

    stage = int(sys.argv[1])
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                 "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
                 "steps_per_print": 1000}
    torch.manual_seed(0)
    # (built outside zero.Init: transformers 5.23's weight init indexes the empty partitioned embedding there;
    # deepspeed.initialize partitions the converted model's parameters for stage 3)
    model = BertForSequenceClassification(config)
    report = quantize_model(model, {"preset": "ternarybert_lat"})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    query = engine.module.bert.encoder.layer[0].attention.self.query
    assert isinstance(query, QuantLinear)
    losses = []
    for step in range(6):
        ids = torch.randint(1, 64, (2, 8))
        loss = engine(input_ids=ids, labels=torch.tensor([0, 1])).loss
        engine.backward(loss)
        engine.step()
        if step % 2 == 1:  # an optimizer step happened (2 micro-batches per step)
            after_optimizer_step(engine.module)
        losses.append(loss.item())
    v = query.weight_quant.second_moment
    if stage == 3:
        assert query.weight.ds_tensor.numel() > 0 and query.weight.numel() == 0  # really partitioned
    out = {"folds": query.weight_quant.lat_folds, "v_shape": list(v.shape), "v_finite": bool(torch.isfinite(v).all()),
           "v_positive": float(v.sum()), "losses": losses, "linears": len(report.of_kind("linear"))}
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_lat_under_deepspeed_zero(tmp_path, stage):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + 17 * stage + os.getpid() % 500),
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    proc = subprocess.run([sys.executable, str(script), str(stage)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["linears"] == 12
    assert result["folds"] == 3  # one per optimizer step
    assert result["v_shape"] == [32, 32]  # full shape, also when ZeRO-3 partitions the parameter
    assert result["v_finite"] and result["v_positive"] > 0


RANKS_SCRIPT = textwrap.dedent(r"""
    import os, sys, torch, torch.distributed as dist
    from torch import nn
    from ds_kdqat.quant import WeightQuantizer, QuantLinear, LatConfig, after_optimizer_step

    rank = int(sys.argv[1])
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{sys.argv[2]}")
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    QuantLinear.convert(lin, WeightQuantizer("lat", lat=LatConfig(beta2=0.5)), None)
    x = torch.full((1, 3), float(rank + 1))  # rank 0 sees x = 1, rank 1 sees x = 2
    lin(x).sum().backward()  # dL/dW = 1·xᵀ per row: rows of 1 (rank 0) and 2 (rank 1)
    after_optimizer_step(lin)
    # averaged gradient 1.5 everywhere; v = (1 − 0.5)·1.5² = 1.125 on both ranks
    assert torch.allclose(lin.weight_quant.second_moment, torch.full((2, 3), 1.125)), lin.weight_quant.second_moment
    print("OK", rank, flush=True)
    # Without an orderly teardown gloo can abort at interpreter exit ("terminate called …") when the peer
    # has already gone.
    dist.barrier()
    dist.destroy_process_group()
""")


def test_lat_second_moment_is_averaged_over_ranks(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT)
    port = str(31000 + os.getpid() % 2000)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0 and out.startswith("OK"), out + err[-3000:]
