"""Masked-LM candidates, the fitted head, and batched augmenter == one-at-a-time reference (tiny BERT)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from augment.augmenter import Augmenter, AugmentParams, word_route
from augment.fit_head import FitHeadOptions, fit_mlm_head
from augment.glove import GloveNeighbours, load_glove
from augment.mlm import build_query, excluded_token_mask, load_masked_lm
from augment.mlm_head import MLMHead, load_head, save_head
from augment.reference import ReferenceAugmenter
from augment.stopwords import load_stopwords
from augment.words import WordSplitter
from ds_kdqat.errors import ConfigError
from test_augment_common import VOCAB, tiny_encoder_dir, tiny_mlm_dir, tiny_tokenizer, write_glove_text

SENTENCES = [
    "The unbelievable movie isn't wonderful!",
    "a very funny film , really good music and a great cast .",
    "Boring plot, dull actor; the ending is long.",
    "it is a charming story",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("aug_mlm")
    lm = load_masked_lm(str(tiny_mlm_dir(d / "mlm")), device="cpu")
    glove = load_glove(str(write_glove_text(d / "glove.test.txt")))
    return {"dir": d, "lm": lm, "glove": glove, "splitter": WordSplitter(lm.tokenizer), "sw": load_stopwords()}


def test_excluded_tokens():
    ex = excluded_token_mask(tiny_tokenizer())
    bad = {t for t, e in zip(VOCAB, ex.tolist()) if e}
    assert bad == {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]", "[unused1]", "##believ", "##able", "##ful", "##ing", "##s", "##ly"}


def test_batched_candidates_equal_topk_of_full_logits(world):
    lm = world["lm"]
    sp = world["splitter"]
    queries = []
    for text in SENTENCES:
        s = sp.split(text)
        flat = [i for ps in s.pieces for i in ps]
        queries += [build_query(flat, q, "pair", 64, lm.cls_id, lm.sep_id, lm.mask_id) for q in range(0, len(flat), 2)]
    got = lm.candidates(queries, 5, batch_size=3)
    for q, cands in zip(queries, got):
        logits = lm.full_logits(q)[q.mask_pos]
        allowed = [i for i in torch.argsort(logits, descending=True).tolist() if not lm.excluded[i]]
        assert cands == [VOCAB[i] for i in allowed[:5]]
        assert not any(c.startswith("##") or c.startswith("[") for c in cands)
    assert lm.candidates(queries, 5, batch_size=len(queries)) == got


def test_head_formula_and_roundtrip(tmp_path):
    torch.manual_seed(0)
    head = MLMHead(8, 20)
    with torch.no_grad():
        head.bias.normal_()
        head.transform["layer_norm"].weight.uniform_(0.5, 1.5)
    emb = torch.randn(20, 8)
    h = torch.randn(3, 8)
    t = F.gelu(h @ head.transform["dense"].weight.T + head.transform["dense"].bias)
    t = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-12)
    t = t * head.transform["layer_norm"].weight + head.transform["layer_norm"].bias
    assert torch.allclose(head(h, emb), t @ emb.T + head.bias, atol=1e-5)
    weights, meta = save_head(head, str(tmp_path / "h"), {"note": "x"})
    back, info = load_head(weights)
    assert info["note"] == "x" and info["vocab_size"] == 20 and info["hidden_size"] == 8
    assert torch.equal(back(h, emb), head(h, emb))


def test_model_without_head_needs_a_fitted_one(tmp_path):
    enc = str(tiny_encoder_dir(tmp_path / "enc"))
    with pytest.raises(ConfigError, match=r"augment.mlm.head.*has no masked-LM head.*fit_mlm_head"):
        load_masked_lm(enc, device="cpu")
    head = MLMHead(16, len(VOCAB))
    weights, _ = save_head(head, str(tmp_path / "head.safetensors"), {})
    lm = load_masked_lm(enc, weights, device="cpu")
    emb = lm.encoder.get_input_embeddings().weight
    q = build_query([VOCAB.index("movie"), VOCAB.index("good")], 1, "pair", 64, lm.cls_id, lm.sep_id, lm.mask_id)
    hidden = lm.encoder(input_ids=torch.tensor([q.input_ids]), token_type_ids=torch.tensor([q.token_type_ids])).last_hidden_state
    with torch.no_grad():
        want = head(hidden[0, q.mask_pos], emb)
    assert torch.allclose(lm.mask_logits([q])[0], want, atol=1e-5)
    wrong = MLMHead(16, len(VOCAB) + 1)
    weights, _ = save_head(wrong, str(tmp_path / "wrong.safetensors"), {})
    with pytest.raises(ConfigError, match="augment.mlm.head.*vocab"):
        load_masked_lm(enc, weights, device="cpu")


def test_fit_head_learns(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    enc_dir = str(tiny_encoder_dir(tmp_path / "enc"))
    encoder, tok = AutoModel.from_pretrained(enc_dir), AutoTokenizer.from_pretrained(enc_dir)
    # a corpus with very few distinct tokens: the head must learn the unigram prior at least
    sentences = ["the movie is good", "the film is great", "the movie is bad", "the plot is dull"] * 60
    opts = FitHeadOptions(unfreeze_layers=0, rounds=2, epochs=4, batch_size=64, lr=1e-2, warmup=0.0, seed=0)
    logs = []
    head, stats = fit_mlm_head(encoder, tok, sentences, opts, log=logs.append)
    assert stats["heldout_top1_after"] > stats["heldout_top1_before"] + 0.2
    assert stats["heldout_top1_after"] > 0.4
    assert any("before" in s for s in logs) and any("after" in s for s in logs)
    assert not any(p.requires_grad for p in encoder.parameters())


def test_routes(world):
    s = world["splitter"].split("The unbelievable movie isn't wonderful!")
    sw = world["sw"]
    routes = [word_route(s, j, sw, "mlm_glove") for j in range(len(s.words))]
    assert dict(zip(s.words, routes)) == {
        "the": None, "unbelievable": "glove", "movie": "mlm", "isn": None, "'": None, "t": None,
        "wonderful": "glove", "!": None,
    }
    assert [word_route(s, j, sw, "glove") for j in (1, 2)] == ["glove", "glove"]
    assert [word_route(s, j, sw, "mlm") for j in (1, 2)] == [None, "mlm"]


@pytest.mark.parametrize("source", ["mlm_glove", "glove", "mlm"])
@pytest.mark.parametrize("mlm_input", ["pair", "masked_only"])
def test_batched_equals_reference(world, source, mlm_input):
    params = AugmentParams(num_candidates=4, replace_prob=0.4, num_new=8, candidate_source=source, mlm_input=mlm_input, batch_size=3)
    aug = Augmenter(world["splitter"], world["sw"], params, GloveNeighbours(world["glove"], 4), world["lm"])
    ref = ReferenceAugmenter(world["splitter"], world["sw"], params, world["glove"], world["lm"])
    examples = [[SENTENCES[0], SENTENCES[1]], [SENTENCES[2]], [SENTENCES[3]]]
    got = aug.augment(examples, [5, 9, 12], seed=3)
    want = [ref.augment_one(fields, 3, idx) for fields, idx in zip(examples, [5, 9, 12])]
    assert got == want
    assert sum(len(x) for e in got for x in e) >= 8  # not a vacuous comparison


def test_candidate_sources_in_table(world):
    params = AugmentParams(num_candidates=2, candidate_source="mlm_glove")
    aug = Augmenter(world["splitter"], world["sw"], params, GloveNeighbours(world["glove"], 2), world["lm"])
    [t] = aug.candidate_tables(["The unbelievable movie isn't wonderful!"])
    assert t.candidates[1] == ["incredible", "amazing"]  # GloVe, cosine order
    assert t.candidates[6] == ["charming", "lovely"]
    assert len(t.candidates[2]) == 2 and all(c in VOCAB for c in t.candidates[2])  # masked LM, vocabulary words
    assert set(t.candidates) == {1, 2, 6}
    [t] = aug.candidate_tables(["a funny scene"])  # 'funny' is one piece, 'scene' too; neither in GloVe
    assert set(t.candidates) == {1, 2}


def test_word_not_in_glove_keeps_itself(world):
    params = AugmentParams(num_candidates=3, candidate_source="glove")
    aug = Augmenter(world["splitter"], world["sw"], params, GloveNeighbours(world["glove"], 3), None)
    [t] = aug.candidate_tables(["boring script"])
    assert t.candidates == {0: ["boring"], 1: ["script"]}


def _load_script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "run" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_run_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fit_mlm_head_command_writes_a_loadable_head(tmp_path, capsys):
    enc = str(tiny_encoder_dir(tmp_path / "enc"))
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(["the movie is good", "the film is great", "a dull plot"] * 10) + "\n")
    out = tmp_path / "heads" / "tiny.safetensors"
    rc = _load_script("fit_mlm_head").main(
        ["--text", str(text), "--model", enc, "--output", str(out), "--epochs", "1", "--device", "cpu",
         "--unfreeze_layers", "1", "--rounds", "1"]
    )
    assert rc == 0 and out.is_file() and out.with_suffix(".json").is_file()
    printed = capsys.readouterr().out
    assert "held-out masked-token accuracy: before top-1" in printed and "top-15 candidates" in printed
    lm = load_masked_lm(enc, str(out), device="cpu")
    assert lm.description["head_info"]["fit"]["train_sentences"] == 27
    assert lm.description["head_info"]["tuned_layers"] == [1]


def test_augment_command_reports_bad_config(tmp_path, capsys):
    rc = _load_script("augment").main(["--task", "sst2", "--p", "2", "--input", str(tmp_path / "x.tsv"), "--no_progress"])
    assert rc == 2 and "augment.replace_prob" in capsys.readouterr().err
