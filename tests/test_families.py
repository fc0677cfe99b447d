"""Every model family works end to end: presets quantize its roles, taps equal HF's outputs, every recipe trains
every parameter, the packed export reproduces the logits, and an unknown family stops at config time.

Parametrised over :data:`CASES` (tiny random-init task models saved and loaded through the family adapter).
Adding a family (T5, ViT, …): a :class:`Case` in ``CASES`` and, for a new input kind, a batch builder in
``BATCHES``.
"""

from __future__ import annotations

import copy
import dataclasses
import types
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    GPT2Config,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    UMT5Config,
    ViTConfig,
    ViTForImageClassification,
)

from ds_kdqat.distill import DistillConfig, kd_forward, kd_phases, phase_at
from ds_kdqat.distill.recipes import RECIPES
from ds_kdqat.errors import ConfigError
from ds_kdqat.models.attention import self_attention_modules
from ds_kdqat.models.families import FAMILIES, ROLE_NAMES, adapter_for, check_model_type
from ds_kdqat.models.families.t5 import (KdqatT5EncoderForSequenceClassification,
                                         KdqatUMT5EncoderForSequenceClassification)
from ds_kdqat.models.taps import TAP_NAMES, forward_with_taps
from ds_kdqat.quant import PRESETS, after_optimizer_step, export_packed, load_packed, quantize_model
from ds_kdqat.quant.modules import QUANT_MODULE_TYPES

LAYERS = 2
TINY = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64, vocab_size=100,
            max_position_embeddings=64)
ENCODER_ROLES = ("query", "key", "value", "attention_output_projection", "ffn_in", "ffn_out")
VIT_TINY = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64, image_size=8,
                patch_size=4, num_channels=3)  # 4 patches + [CLS]


@dataclass
class Case:
    config: Callable[[], object]  # a tiny HF config
    model_class: type  # the task model saved to disk (random init)
    linears_per_layer: int = 6  # modules with an encoder role per layer (a gated FFN has one more)
    pooler: bool = False  # the task model has a pooler dense (quantized by ternarybert_reference)
    word_embedding: bool = True


CASES = {
    "bert": Case(lambda: BertConfig(**TINY), BertForSequenceClassification, pooler=True),
    "roberta": Case(lambda: RobertaConfig(pad_token_id=1, **TINY), RobertaForSequenceClassification),
    "electra": Case(lambda: ElectraConfig(embedding_size=16, **TINY), ElectraForSequenceClassification),
    "distilbert": Case(lambda: DistilBertConfig(vocab_size=100, dim=32, n_layers=LAYERS, n_heads=2, hidden_dim=64,
                                                max_position_embeddings=64), DistilBertForSequenceClassification),
    # T5-style encoders (encoder only, mean-pooling head): t5 with a ReLU FFN (wi), umt5 with a gated one
    # (wi_0, wi_1: one more ffn_in per layer) and a relative position bias in every layer
    "t5": Case(lambda: T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=LAYERS, num_heads=2),
               KdqatT5EncoderForSequenceClassification),
    "umt5": Case(lambda: UMT5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=LAYERS, num_heads=2),
                 KdqatUMT5EncoderForSequenceClassification, linears_per_layer=7),
    # ViT: pre-LN, pixel inputs, no word embedding, no pooler in the classification model
    "vit": Case(lambda: ViTConfig(**VIT_TINY), ViTForImageClassification, word_embedding=False),
}
FAMILY_NAMES = list(CASES)


def token_batch(adapter) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[3, 15, 27, 9, 44, 4], [3, 11, 52, 4, 0, 0], [3, 8, 90, 61, 33, 4]])
    mask = (torch.arange(6)[None] < torch.tensor([[6], [4], [6]])).long()
    batch = {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.tensor([0, 1, 1])}
    if adapter.token_type_ids:
        batch["token_type_ids"] = torch.zeros_like(ids)
    return batch


def pixel_batch(adapter) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    size, channels = VIT_TINY["image_size"], VIT_TINY["num_channels"]
    return {"pixel_values": torch.randn(3, channels, size, size, generator=generator),
            "labels": torch.tensor([0, 1, 1])}


BATCHES = {"tokens": token_batch, "pixels": pixel_batch}  # input kind -> batch builder


def model_inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> folder of its tiny random-init task model (saved once per module)."""
    folders = {}

    def get(family: str) -> str:
        if family not in folders:
            torch.manual_seed(0)
            folder = tmp_path_factory.mktemp(family)
            CASES[family].model_class(CASES[family].config()).save_pretrained(folder)
            folders[family] = str(folder)
        return folders[family]

    return get


def load(saved, family):
    """The task model through its adapter (eager attention), and the adapter."""
    adapter = FAMILIES[CASES[family].config().model_type]
    torch.manual_seed(1)
    model = adapter.load_task_model(saved(family), num_labels=2, problem_type=None, local_files_only=True)
    assert adapter_for(model) is adapter
    return model.eval(), adapter


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_adapter_finds_layers_roles_and_attention(saved, family):
    model, adapter = load(saved, family)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(saved(family), local_files_only=True)
    assert adapter.has_task_head(config, 2) and not adapter.has_task_head(config, 3)
    assert len(adapter.layer_modules(model)) == LAYERS
    assert len(self_attention_modules(model)) == LAYERS
    found = {role: adapter.role_modules(model, role) for role in ENCODER_ROLES}
    assert all(len(modules) >= LAYERS for modules in found.values()), found
    assert sum(len(modules) for modules in found.values()) == CASES[family].linears_per_layer * LAYERS
    assert all(type(m) is torch.nn.Linear for modules in found.values() for _, m in modules)
    assert len(adapter.value_projections(model)) == LAYERS
    assert len(adapter.role_modules(model, "word_embedding")) == int(CASES[family].word_embedding)
    assert len(adapter.role_modules(model, "pooler")) == int(CASES[family].pooler)
    assert set(adapter.roles) <= set(ROLE_NAMES)


def expected_counts(family: str, preset: str) -> tuple[int, int, int]:
    """(linear, embedding, attention) entries of the quantization report."""
    case = CASES[family]
    if preset == "none":
        return 0, 0, 0
    linears = case.linears_per_layer * LAYERS + (1 if preset == "ternarybert_reference" and case.pooler else 0)
    return linears, int(case.word_embedding), LAYERS


def kd_step(teacher, student, batch, recipe="ternarybert", **distill):
    """One KD-QAT step of ``recipe`` (its first KD phase) with a plain torch optimizer; returns the loss."""
    phases, _ = kd_phases(DistillConfig(recipe=recipe, **distill), base_steps=2, num_layers=LAYERS,
                          task_type="classification")
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    loss, _ = kd_forward(teacher, student, batch, phase_at(phases, 0))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    after_optimizer_step(student)
    return loss


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_preset_quantizes_the_roles_trains_and_exports(saved, tmp_path, family, preset):
    teacher, adapter = load(saved, family)
    student = copy.deepcopy(teacher)
    report = quantize_model(student, {"preset": preset})
    linears, embeddings, attention = expected_counts(family, preset)
    assert (len(report.of_kind("linear")), len(report.of_kind("embedding")), len(report.of_kind("attention"))) \
        == (linears, embeddings, attention)
    if preset != "none":  # exactly the modules with the preset's roles
        roles = list(ENCODER_ROLES) + (["pooler"] if preset == "ternarybert_reference" else [])
        expected = {name for role in roles for name, _ in adapter.role_modules(teacher, role)}
        assert {e.name for e in report.of_kind("linear")} == expected
        assert [e.name for e in report.of_kind("embedding")] == [n for n, _ in adapter.role_modules(teacher,
                                                                                                    "word_embedding")]

    batch = BATCHES[adapter.input_kind](adapter)
    assert torch.isfinite(kd_step(teacher, student.train(), batch))

    student.eval()
    with torch.no_grad():
        expected_logits = student(**model_inputs(batch)).logits
    export_packed(student, tmp_path / "packed")
    loaded = load_packed(tmp_path / "packed", lambda: load(saved, family)[0]).eval()
    with torch.no_grad():
        got = loaded(**model_inputs(batch)).logits
    assert torch.equal(got, expected_logits)
    assert sum(isinstance(m, QUANT_MODULE_TYPES) for m in loaded.modules()) == linears + embeddings


# Families whose HF hidden_states[-1] is the last layer's raw output (T5's is already after its final norm).
HF_LAST_HIDDEN_BEFORE_FINAL_NORM = {"vit"}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_taps_equal_hf_outputs(saved, family):
    model, adapter = load(saved, family)
    batch = BATCHES[adapter.input_kind](adapter)
    with torch.no_grad():
        reference = model(**model_inputs(batch), output_hidden_states=True, output_attentions=True)  # HF eager
        taps = forward_with_taps(model, batch, TAP_NAMES)
    expected = list(reference.hidden_states)
    if family in HF_LAST_HIDDEN_BEFORE_FINAL_NORM:  # our X_L is after the final norm (FamilyAdapter.final_norm)
        with torch.no_grad():
            expected[-1] = adapter.final_norm_module(model)(expected[-1])
    assert len(taps.layer_outputs) == LAYERS + 1 == len(expected)
    for ours, theirs in zip(taps.layer_outputs, expected):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert len(taps.attention_maps) == LAYERS == len(reference.attentions)
    for ours, theirs in zip(taps.attention_maps, reference.attentions):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(taps.logits, reference.logits, atol=1e-5, rtol=0)
    assert all(t is not None for name in ("attention_scores", "contexts", "mha_outputs", "attention_outputs")
               for t in getattr(taps, name))


def recipe_config(recipe: str) -> dict:
    # custom needs its terms; pred + attention_output exercises a term no named KD recipe pairs with pred alone
    return {"terms": ["pred", "attention_output"]} if recipe == "custom" else {}


def no_gradient_expected(family: str, recipe: str) -> set[str]:
    """Student parameters that legitimately get no gradient in the KD phase of ``recipe``.

    None today: every recipe (custom: as configured above) has the ``pred`` term, whose logits depend on every
    parameter on the path embeddings → layers → pooler/head, and all but custom have ``layer_output`` over all
    layers. A recipe without ``pred`` would list the pooler and the classification head here; one whose
    deepest term is an attention map would list the last layer's V, W_O, FFN and LayerNorms.
    """
    return set()


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_recipe_trains_every_parameter(saved, family, recipe):
    teacher, adapter = load(saved, family)
    student = copy.deepcopy(teacher)
    quantize_model(student, {"preset": "ternarybert"})
    student.train()
    config = DistillConfig(recipe=recipe, **recipe_config(recipe))
    teacher_intervention = RECIPES[recipe].teacher_intervention
    phases, _ = kd_phases(config, base_steps=6 if teacher_intervention else 2, num_layers=LAYERS,
                          task_type="classification")
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    batch = BATCHES[adapter.input_kind](adapter)
    seen, kd_steps = set(), 0
    for step in range(phases[-1].end):
        phase = phase_at(phases, step)
        seen.add(phase.name)
        loss, terms = kd_forward(teacher, student, batch, phase)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        if phase.name == "kd":
            kd_steps += 1
            without = {name for name, p in student.named_parameters()
                       if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)}
            assert without == no_gradient_expected(family, recipe), sorted(without)
        optimizer.step()
        after_optimizer_step(student)
        if kd_steps == 2:
            break
    assert kd_steps == 2
    assert seen == ({"ti_output", "ti_map", "kd"} if recipe == "ti_gradual" else
                    {recipe, "kd"} if teacher_intervention else {"kd"})


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_roles_are_validated_and_resolved_per_family(saved, family):
    model, adapter = load(saved, family)
    with pytest.raises(ConfigError) as err:
        quantize_model(copy.deepcopy(model), {"groups": [{"roles": ["query", "querry"]}]})
    assert err.value.path == "kdqat.quant.groups[0].roles[1]"
    assert '"querry"' in err.value.message and '"attention_output_projection"' in err.value.message
    report = quantize_model(copy.deepcopy(model), {"groups": [{"roles": ["value"]}], "attention": {"bits": None}})
    assert [e.name for e in report.entries] == [n for n, _ in adapter.role_modules(model, "value")]
    if not CASES[family].pooler:
        with pytest.raises(ConfigError) as err:
            quantize_model(copy.deepcopy(model), {"groups": [{"roles": ["pooler"]}]})
        assert err.value.path == "kdqat.quant.groups[0].roles[0]"


def test_unknown_family_fails_when_the_config_is_read(tmp_path, monkeypatch):
    with pytest.raises(ConfigError) as err:
        check_model_type(types.SimpleNamespace(model_type="xyz"), "kdqat.model.teacher")
    assert str(err.value) == ("kdqat.model.teacher: model_type 'xyz' has no ds-kdqat adapter; supported: bert, "
                              "distilbert, electra, mt5, roberta, t5, umt5, vit")
    assert check_model_type(types.SimpleNamespace(model_type="distilbert"), "k") is FAMILIES["distilbert"]
    partial = dataclasses.replace(FAMILIES["vit"], model_types=("vit_partial",), status="partial", note="no taps")
    monkeypatch.setitem(FAMILIES, "vit_partial", partial)
    with pytest.raises(ConfigError, match=r"the vit adapter is partial \(no taps\)"):
        check_model_type(types.SimpleNamespace(model_type="vit_partial"), "kdqat.model.teacher")
    monkeypatch.delitem(FAMILIES, "vit_partial")

    # through the job's prepare(): before the output folder is claimed or anything is loaded
    from ds_kdqat import pipeline
    from ds_kdqat.config import load_config
    from ds_kdqat.training.distributed import DistInfo
    from tests.tiny import make_task_dir, write_config

    model_dir = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50).save_pretrained(model_dir)
    path = write_config(tmp_path / "c.json", model_dir, make_task_dir(tmp_path / "task", 8, 4), tmp_path / "out")
    monkeypatch.setattr(pipeline, "init_distributed", lambda: DistInfo(0, 0, 1, "cpu"))
    with pytest.raises(ConfigError) as err:
        pipeline.prepare(load_config(str(path)))
    assert err.value.path == "kdqat.model.teacher"
    assert err.value.message.startswith("model_type 'gpt2' has no ds-kdqat adapter; supported: bert, distilbert")
    assert not (tmp_path / "out").exists()


def test_vit_pre_ln_taps(saved):
    """ViT's pre-LN tap definitions (see ds_kdqat/models/families/vit.py): Y_l = X_l + MHA_l (the input of
    layernorm_after), X_{l+1} = Y_l + MLP(LN(Y_l)), the last one after the final LayerNorm; scores unmasked over 4 patches + [CLS]; TI-O writes the
    teacher's MHA output into Y_l."""
    model, adapter = load(saved, "vit")
    batch = pixel_batch(adapter)
    with torch.no_grad():
        taps = forward_with_taps(model, batch, TAP_NAMES)
        layers = adapter.layer_modules(model)
        for l, layer in enumerate(layers):
            x, y, mha = taps.layer_outputs[l], taps.attention_outputs[l], taps.mha_outputs[l]
            torch.testing.assert_close(y, x + mha, atol=1e-6, rtol=0)
            out = y + layer.mlp(layer.layernorm_after(y))
            if l == len(layers) - 1:  # X_L: after the final LayerNorm
                out = model.vit.layernorm(out)
            torch.testing.assert_close(taps.layer_outputs[l + 1], out, atol=1e-6, rtol=0)
            assert taps.attention_scores[l].shape == (3, 2, 5, 5) and torch.isfinite(taps.attention_scores[l]).all()
        assert taps.attention_mask.shape == (3, 5) and bool(taps.attention_mask.all())
        from ds_kdqat.models.taps import Interventions

        teacher_mha = torch.randn_like(taps.mha_outputs[0])
        intervened = forward_with_taps(model, batch, {"attention_outputs"},
                                       interventions=Interventions(mha_outputs={0: teacher_mha}))
        torch.testing.assert_close(intervened.attention_outputs[0], taps.layer_outputs[0] + teacher_mha,
                                   atol=1e-6, rtol=0)
