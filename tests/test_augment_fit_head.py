"""Fitting the masked-LM head with the encoder's top layers tuned: which weights change, the head file
(format 2, tuned layers inside; format 1 still read), the figures (top-k, candidate check)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from augment.fit_head import (
    FitHeadOptions, TopLayers, candidate_recall, fit_mlm_head, masked_batches, topk_accuracy, topk_hits,
)
from augment.mlm import MaskedLM, build_query, load_masked_lm
from augment.mlm_head import HEAD_FORMAT, MLMHead, apply_tuned_encoder, load_head, save_head
from ds_kdqat.errors import ConfigError, DataError
from test_augment_common import VOCAB, tiny_tokenizer

CORPUS = ["the movie is good", "the film is great", "the movie is bad", "the plot is dull", "a funny film",
          "it is a very long story", "the cast and the music"] * 8


def tiny_encoder(path: Path, layers: int = 3, seed: int = 0) -> Path:
    """A random ``layers``-layer BertModel (no masked-LM head) and the tiny WordPiece tokenizer in ``path``."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def load(path: Path):
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(str(path)), AutoTokenizer.from_pretrained(str(path))


def quick(**kw) -> FitHeadOptions:
    base = dict(unfreeze_layers=1, rounds=2, epochs=2, sentence_batch=8, lr=1e-2, encoder_lr=1e-3, eval_words=20)
    return FitHeadOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A 3-layer encoder fitted with its top layer; the state before, the head, its figures and its file."""
    d = tmp_path_factory.mktemp("fit_head")
    enc_dir = tiny_encoder(d / "enc")
    encoder, tok = load(enc_dir)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    logs: list[str] = []
    head, stats = fit_mlm_head(encoder, tok, CORPUS, quick(), log=logs.append)
    weights, meta = save_head(head, str(d / "head.safetensors"), {"encoder": str(enc_dir), "fit": stats})
    return {"dir": d, "enc_dir": enc_dir, "encoder": encoder, "tok": tok, "before": before, "head": head,
            "stats": stats, "logs": logs, "weights": weights, "meta": meta}


def test_only_the_top_layers_change(fitted):
    after = fitted["encoder"].state_dict()
    changed = {k for k, v in fitted["before"].items() if not torch.equal(v, after[k])}
    top = {k for k in after if k.startswith("encoder.layer.2.")}
    assert changed == top and len(top) == 16  # every tensor of layer 2 moved, nothing else
    head = fitted["head"]
    assert head.tuned_layers == [2]
    assert set(head.encoder_tensors) == top
    assert all(torch.equal(head.encoder_tensors[k], after[k]) for k in top)
    assert not any(p.requires_grad for p in fitted["encoder"].parameters())


def test_top_layers_forward_equals_the_encoder():
    torch.manual_seed(1)
    encoder, tok = load(tiny_encoder(Path(__import__("tempfile").mkdtemp()) / "e"))
    encoder.eval()
    opts = FitHeadOptions(unfreeze_layers=2)
    [batch] = masked_batches(tok, ["the movie is good", "a film"], 8, opts, torch.Generator().manual_seed(0))
    top = TopLayers(encoder, 2)
    assert top.first == 1 and top.indices == [1, 2]
    with torch.no_grad():
        want = encoder(**batch.encoder_kwargs(torch.device("cpu"))).last_hidden_state
        got = top.forward(top.capture(batch, torch.device("cpu")))
    assert torch.allclose(got, want, atol=1e-6)
    with pytest.raises(ConfigError, match="fit_mlm_head.unfreeze_layers.*3 layers"):
        TopLayers(encoder, 4)


def test_figures_of_the_fit(fitted):
    stats, logs = fitted["stats"], fitted["logs"]
    for key in ("heldout_top1_before", "heldout_top15_before", "heldout_top1_after", "heldout_top15_after"):
        assert 0.0 <= stats[key] <= 1.0
    assert stats["heldout_top15_after"] >= stats["heldout_top1_after"]
    assert stats["heldout_top1_after"] > stats["heldout_top1_before"]
    recall = stats["candidate_recall"]
    assert recall["input"] == "pair" and recall["m"] == 15 and recall["words"] >= 1
    assert recall["share"] == recall["in_top"] / recall["words"]
    assert stats["tuned_layers"] == [2] and stats["unfreeze_layers"] == 1
    assert any("before top-1" in s for s in logs) and any("after top-1" in s for s in logs)
    assert any("top-15 candidates" in s for s in logs)


def test_head_file_carries_the_tuned_layers(fitted):
    info = json.loads(Path(fitted["meta"]).read_text())
    assert info["format"] == HEAD_FORMAT and info["version"] == 2
    assert info["tuned_layers"] == [2]
    assert info["tuned_parameters"] == sorted(fitted["head"].encoder_tensors)
    assert info["encoder"] == str(fitted["enc_dir"])
    from safetensors.torch import load_file

    names = set(load_file(fitted["weights"]))
    assert {n for n in names if n.startswith("encoder.")} == {"encoder." + n for n in info["tuned_parameters"]}


def _queries(lm, texts):
    out = []
    for text in texts:
        ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        out += [build_query(ids, q, "pair", 64, lm.cls_id, lm.sep_id, lm.mask_id) for q in range(len(ids))]
    return out


def test_saved_head_reproduces_the_fitted_model(fitted):
    encoder, head, tok = fitted["encoder"], fitted["head"], fitted["tok"]
    emb = encoder.get_input_embeddings().weight
    in_memory = MaskedLM(tok, encoder, lambda h: head(h, emb), torch.device("cpu"), {})
    loaded = load_masked_lm(str(fitted["enc_dir"]), fitted["weights"], device="cpu")
    queries = _queries(loaded, ["the movie is good", "a very funny film"])
    assert torch.equal(loaded.mask_logits(queries), in_memory.mask_logits(queries))
    # the untouched encoder (no tuned layers applied) gives other logits: the layers matter
    plain, _ = load(fitted["enc_dir"])
    bare = MaskedLM(tok, plain, lambda h: head(h, plain.get_input_embeddings().weight), torch.device("cpu"), {})
    assert not torch.allclose(bare.mask_logits(queries), in_memory.mask_logits(queries))


def _write_v1(head: MLMHead, path: Path) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(path))
    info = {"format": HEAD_FORMAT, "version": 1, "hidden_size": 16, "vocab_size": len(VOCAB),
            "layer_norm_eps": 1e-12, "hidden_act": "gelu", "encoder": "x"}
    path.with_suffix(".json").write_text(json.dumps(info))
    return str(path)


def test_version_1_head_still_loads(tmp_path):
    enc_dir = tiny_encoder(tmp_path / "enc", layers=2)
    torch.manual_seed(3)
    head = MLMHead(16, len(VOCAB))
    with torch.no_grad():
        head.bias.normal_()
    weights = _write_v1(head, tmp_path / "v1.safetensors")
    back, info = load_head(weights)
    assert info["version"] == 1 and back.encoder_tensors == {} and back.tuned_layers == []
    lm = load_masked_lm(str(enc_dir), weights, device="cpu")
    plain, _ = load(enc_dir)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), lm.encoder.state_dict().values()))
    queries = _queries(lm, ["the movie is good"])
    emb = plain.get_input_embeddings().weight
    want = MaskedLM(lm.tokenizer, plain, lambda h: head(h, emb), torch.device("cpu"), {}).mask_logits(queries)
    assert torch.equal(lm.mask_logits(queries), want)


def _head_with(tensors: dict, tmp_path: Path, name: str) -> str:
    head = MLMHead(16, len(VOCAB))
    head.encoder_tensors = tensors
    head.tuned_layers = [1]
    weights, _ = save_head(head, str(tmp_path / name), {"encoder": "tiny"})
    return weights


def test_bad_tuned_tensors_are_data_errors(tmp_path):
    enc_dir = str(tiny_encoder(tmp_path / "enc", layers=2))
    shape = _head_with({"encoder.layer.1.output.dense.weight": torch.zeros(16, 31)}, tmp_path, "shape.safetensors")
    want = r"shape\.safetensors.*encoder\.layer\.1\.output\.dense\.weight.*\(16, 31\).*\(16, 32\)"
    with pytest.raises(DataError, match=want):
        load_masked_lm(enc_dir, shape, device="cpu")
    name = _head_with({"encoder.layer.7.output.dense.weight": torch.zeros(16, 32)}, tmp_path, "name.safetensors")
    with pytest.raises(DataError, match=r"name\.safetensors.*encoder\.layer\.7.*no parameter.*fitted on tiny"):
        load_masked_lm(enc_dir, name, device="cpu")
    # the JSON's list and the file's tensors must agree
    ok = _head_with({"encoder.layer.1.output.dense.bias": torch.zeros(16)}, tmp_path, "list.safetensors")
    meta = Path(ok).with_suffix(".json")
    info = json.loads(meta.read_text())
    info["tuned_parameters"] = ["encoder.layer.0.output.dense.bias"]
    meta.write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"list\.safetensors.*tuned_parameters"):
        load_head(ok)
    info["version"] = 3
    meta.write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"list\.json.*version 3"):
        load_head(ok)


def test_apply_checks_everything_before_copying(tmp_path):
    encoder, _ = load(tiny_encoder(tmp_path / "enc", layers=2))
    head = MLMHead(16, len(VOCAB))
    head.encoder_tensors = {"encoder.layer.1.output.dense.bias": torch.ones(16),
                            "encoder.layer.1.output.dense.weight": torch.ones(3)}
    before = encoder.encoder.layer[1].output.dense.bias.clone()
    with pytest.raises(DataError, match="h.safetensors"):
        apply_tuned_encoder(encoder, head, {}, "h.safetensors")
    assert torch.equal(encoder.encoder.layer[1].output.dense.bias, before)
    del head.encoder_tensors["encoder.layer.1.output.dense.weight"]
    assert apply_tuned_encoder(encoder, head, {}, "h.safetensors") == 1
    assert torch.equal(encoder.encoder.layer[1].output.dense.bias, torch.ones(16))


def test_topk_accuracy_by_hand():
    logits = torch.tensor([
        [0.1, 0.9, 0.3, 0.2],  # order 1, 2, 3, 0
        [0.8, 0.1, 0.5, 0.7],  # order 0, 3, 2, 1
        [0.2, 0.3, 0.4, 0.1],  # order 2, 1, 0, 3
    ])
    targets = torch.tensor([1, 2, 3])  # ranks 1, 3, 4
    assert topk_hits(logits, targets, (1, 2, 3, 4)) == {1: 1, 2: 1, 3: 2, 4: 3}
    assert topk_accuracy(logits, targets, (1, 3)) == {1: 1 / 3, 3: 2 / 3}
    assert topk_accuracy(logits[:0], targets[:0], (1,)) == {1: 0.0}


class _FixedCandidates:
    """A stand-in masked LM that offers the same candidates for every query."""

    def __init__(self, tokenizer, cands):
        self.tokenizer, self.cands = tokenizer, cands
        self.max_positions, self.cls_id, self.sep_id, self.mask_id = 64, 2, 3, 4
        self.calls = 0

    def candidates(self, queries, m, batch_size):
        self.calls += len(queries)
        return [self.cands[:m] for _ in queries]


def test_candidate_recall_by_hand(tmp_path):
    _, tok = load(tiny_encoder(tmp_path / "enc", layers=1))
    stop = frozenset({"the", "is", "a"})
    lm = _FixedCandidates(tok, ["movie", "dull", "film"])
    # eligible single-piece words: movie, good | dull, plot | wonderful is two pieces (GloVe's), not counted
    texts = ["the movie is good", "a dull plot", "the wonderful ending"]
    got = candidate_recall(lm, texts, stop, m=2, max_words=100)
    assert (got.words, got.in_top, got.share) == (5, 2, 0.4)  # movie, dull found; good, plot, ending not
    got = candidate_recall(lm, texts, stop, m=3, max_words=2)  # whole sentences until >= 2 words: the first
    assert (got.words, got.in_top) == (2, 1)


def test_frozen_path_still_fits_the_head_only(tmp_path):
    encoder, tok = load(tiny_encoder(tmp_path / "enc", layers=2))
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    head, stats = fit_mlm_head(encoder, tok, CORPUS, quick(unfreeze_layers=0, eval_words=0), log=lambda s: None)
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in before.items())
    assert head.encoder_tensors == {} and stats["tuned_layers"] == [] and stats["candidate_recall"] is None


def test_options_are_checked():
    with pytest.raises(ConfigError, match="fit_mlm_head.unfreeze_layers"):
        FitHeadOptions(unfreeze_layers=-1).validate()
    with pytest.raises(ConfigError, match="fit_mlm_head.eval_input"):
        FitHeadOptions(eval_input="both").validate()
    with pytest.raises(ConfigError, match="fit_mlm_head.encoder_lr"):
        FitHeadOptions(encoder_lr=0).validate()


@pytest.mark.slow
def test_tuned_layers_beat_the_frozen_head_on_the_packaged_minilm():
    """Packaged MiniLM, the first 1,600 sentences of the embedded train split, a small budget (≈ 3 min, one core)."""
    from augment.mlm import packaged_minilm_path
    from ds_kdqat.data.embedded import EmbeddedDataMissing

    try:
        from ds_kdqat.data.config import DataConfig
        from ds_kdqat.data.loading import task_dir

        train = task_dir(DataConfig(task="rt_polarity")) / "train.tsv"
        lines = [ln.split("\t")[0] for ln in train.read_text(encoding="utf-8").splitlines()[1:1601]]
    except (EmbeddedDataMissing, OSError):
        pytest.skip("the embedded rt_polarity data is not available: run scripts/fetch_embedded_data.sh")
    figures = {}
    for k in (0, 2):
        encoder, tok = load(Path(packaged_minilm_path()))
        opts = FitHeadOptions(unfreeze_layers=k, rounds=2, epochs=2, eval_words=300)
        _, figures[k] = fit_mlm_head(encoder, tok, lines, opts, log=lambda s: None)
    tuned, frozen = figures[2], figures[0]
    print({k: (v["heldout_top1_after"], v["heldout_top15_after"], v["candidate_recall"]) for k, v in figures.items()})
    assert tuned["heldout_top1_after"] > frozen["heldout_top1_after"] + 0.03
    assert tuned["heldout_top15_after"] > frozen["heldout_top15_after"]
    assert tuned["candidate_recall"]["share"] >= frozen["candidate_recall"]["share"]


def test_reference_augmenter_agrees_with_a_tuned_head(fitted):
    from augment.augmenter import Augmenter, AugmentParams
    from augment.reference import ReferenceAugmenter
    from augment.stopwords import load_stopwords
    from augment.words import WordSplitter

    lm = load_masked_lm(str(fitted["enc_dir"]), fitted["weights"], device="cpu")
    params = AugmentParams(num_candidates=4, replace_prob=0.5, num_new=6, candidate_source="mlm", batch_size=3)
    splitter, stop = WordSplitter(lm.tokenizer), load_stopwords()
    examples = [["the movie is good", "a very funny film"], ["the plot is dull"]]
    got = Augmenter(splitter, stop, params, None, lm).augment(examples, [0, 1], seed=5)
    ref = ReferenceAugmenter(splitter, stop, params, None, lm)
    assert got == [ref.augment_one(fields, 5, i) for i, fields in enumerate(examples)]
