"""Pure parts of the augmenter: words, stop words, sampling, GloVe, query building, masking, config."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from augment.config import AugmentConfig, GloveConfig, JobConfig, MLMConfig, default_num_new
from augment.glove import GloveNeighbours, load_glove, load_packaged, load_text, unit_rows
from augment.mlm import build_query
from augment.mlm_head import mask_tokens
from augment.sampling import draw_sentences, example_rng
from augment.stopwords import load_stopwords
from augment.words import WordSplitter, is_eligible
from ds_kdqat.errors import ConfigError, DataError
from test_augment_common import GLOVE_ROWS, VOCAB, tiny_tokenizer, write_glove_text


# ------------------------------------------------------------------------------------------ words


def test_word_splitting_and_pieces():
    sp = WordSplitter(tiny_tokenizer())
    s = sp.split("The Unbelievable movie isn't WONDERFUL!")
    assert s.words == ("the", "unbelievable", "movie", "isn", "'", "t", "wonderful", "!")
    ids = {t: i for i, t in enumerate(VOCAB)}
    assert s.pieces[1] == (ids["un"], ids["##believ"], ids["##able"])
    assert s.pieces[2] == (ids["movie"],)
    assert s.pieces[6] == (ids["wonder"], ids["##ful"])
    assert s.text() == "the unbelievable movie isn ' t wonderful !"


def test_eligibility_and_stopwords(tmp_path):
    sw = load_stopwords()
    assert {"the", "is", "isn", "t", "not", "and"} <= sw
    assert is_eligible("movie", sw) and not is_eligible("the", sw)
    assert not is_eligible("!", sw) and not is_eligible("21st", sw) and not is_eligible("'", sw)
    f = tmp_path / "sw.txt"
    f.write_text("# mine\nMovie\n\nfilm  # trailing comment\n")
    assert load_stopwords(str(f)) == frozenset({"movie", "film"})
    f.write_text("ok\ntwo words\n")
    with pytest.raises(DataError, match=r"sw.txt:2"):
        load_stopwords(str(f))


def test_non_wordpiece_tokenizer_is_rejected():
    class Fake:
        backend_tokenizer = None

    with pytest.raises(ConfigError, match="augment.mlm.model.*WordPiece"):
        WordSplitter(Fake())


# --------------------------------------------------------------------------------------- sampling


def test_example_rng_depends_on_seed_and_index_only():
    a = [example_rng(7, 3).random() for _ in range(2)]
    assert a[0] == a[1]
    assert example_rng(7, 3).random() != example_rng(7, 4).random()
    assert example_rng(7, 3).random() != example_rng(8, 3).random()


def test_draw_matches_hand_replay():
    """Replays the documented draw order with a twin stream: choice from the sorted pool, then u < p."""
    words = ["a", "good", "movie", "indeed"]
    cands = {1: ["great", "fine", "good"], 2: ["film", "picture"]}
    out = draw_sentences(words, cands, 0.5, 6, random.Random(11))
    twin = random.Random(11)
    expected, seen = [], {"a good movie indeed"}
    for _ in range(6):
        new = list(words)
        for j, pool in ((1, ["fine", "good", "great"]), (2, ["film", "picture"])):
            c = twin.choice(pool)
            if twin.random() < 0.5:
                new[j] = c
        s = " ".join(new)
        if s not in seen:
            seen.add(s)
            expected.append(s)
    assert out == expected
    assert len(out) == len(set(out)) and "a good movie indeed" not in out


def test_draw_extremes():
    words = ["x", "y"]
    assert draw_sentences(words, {0: ["z"], 1: ["w"]}, 0.0, 10, random.Random(0)) == []
    assert draw_sentences(words, {0: ["z"], 1: ["w"]}, 1.0, 10, random.Random(0)) == ["z w"]
    assert draw_sentences(words, {0: ["x"]}, 1.0, 10, random.Random(0)) == []  # only itself: nothing new
    assert draw_sentences(words, {}, 1.0, 10, random.Random(0)) == []


def test_replacement_rate_is_p():
    """Each eligible word is replaced with probability p (candidates never equal the word)."""
    n_words, p = 40, 0.3
    words = [f"w{i}" for i in range(n_words)]
    cands = {i: [f"c{i}a", f"c{i}b", f"c{i}c"] for i in range(0, n_words, 2)}  # every other word eligible
    out = draw_sentences(words, cands, p, 300, random.Random(5))
    assert len(out) == 300  # 20 eligible words: duplicates are practically impossible
    changed = [sum(a != b for a, b in zip(s.split(), words)) for s in out]
    rate = sum(changed) / (len(out) * len(cands))
    assert abs(rate - p) < 0.02  # 6000 Bernoulli(0.3) trials: sd 0.006
    for s in out:  # ineligible words never change; replacements come from the word's own list
        for i, (a, b) in enumerate(zip(s.split(), words)):
            assert a == b or (i in cands and a in cands[i])


# ------------------------------------------------------------------------------------------ GloVe


def _cos_rank(word: str, m: int) -> list[str]:
    v = {w: np.array(x, dtype=np.float64) for w, x in GLOVE_ROWS.items()}
    q = v[word] / np.linalg.norm(v[word])
    sims = {}
    for w, x in v.items():
        if w == word:
            continue
        n = np.linalg.norm(x)
        sims[w] = 0.0 if n == 0 else float(q @ x / n)
    return [w for w, _ in sorted(sims.items(), key=lambda kv: -kv[1])][:m]


def test_glove_text_neighbours_are_cosine_top_m(tmp_path):
    g = load_glove(str(write_glove_text(tmp_path / "glove.test.txt")))
    assert g.words == list(GLOVE_ROWS) and g.vectors.shape == (9, 3)
    nb = GloveNeighbours(g, num_candidates=3, query_batch=2)
    # hand values: cos(unbelievable, incredible) = .9/sqrt(.82) = .9939, cos(.., amazing) = .8/sqrt(.73) = .9363
    assert nb.neighbours("unbelievable") == ["incredible", "amazing", "charming"]
    assert nb.neighbours("unbelievable") == _cos_rank("unbelievable", 3)
    for w in ("wonderful", "movie", "film", "lovely"):
        assert nb.neighbours(w) == _cos_rank(w, 3)
        assert w not in nb.neighbours(w)
    assert nb.neighbours("notaword") == []
    # batched look-ups equal one-by-one look-ups
    fresh = GloveNeighbours(g, num_candidates=3, query_batch=3)
    assert fresh.many(["film", "amazing", "notaword", "film"]) == [nb.neighbours("film"), nb.neighbours("amazing"), [], nb.neighbours("film")]


def test_unit_rows_keeps_zero_rows():
    u = unit_rows(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    assert torch.allclose(u, torch.tensor([[0.6, 0.8], [0.0, 0.0]]))


def test_glove_vocab_size_and_spaces_and_bad_line(tmp_path):
    f = tmp_path / "glove.x.txt"
    f.write_text("c 0 1\na b 1 0\nd 1 1\n")  # a word holding a space (840B has some)
    g = load_text(str(f), vocab_size=2)
    assert g.words == ["c", "a b"] and g.vectors.tolist() == [[0.0, 1.0], [1.0, 0.0]]
    f.write_text("a 1 0\nc 0 x\n")
    with pytest.raises(DataError, match=r"glove.x.txt:2.*bad number"):
        load_text(str(f))
    f.write_text("a 1 0\nc 0\n")
    with pytest.raises(DataError, match=r"glove.x.txt:2.*expected a word and 2 numbers"):
        load_text(str(f))


def test_glove_packaged_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    words = list(GLOVE_ROWS)
    np.save(tmp_path / "glove_test_emb.npy", np.array(list(GLOVE_ROWS.values()), dtype=np.float32))
    pq.write_table(pa.table({"index": words}), tmp_path / "glove_test_index.parquet")
    g = load_glove(str(tmp_path), "auto", vocab_size=5)
    assert g.words == words[:5] and g.vectors.shape == (5, 3)
    assert load_packaged(str(tmp_path)).vectors[6].tolist() == [0.0, 0.0, 1.0]
    with pytest.raises(ConfigError, match="augment.glove.path.*expects a glove"):
        load_glove(str(tmp_path), "text")


def test_packaged_glove_default_is_readable():
    g = load_glove(vocab_size=1000)
    assert len(g.words) == 1000 and g.vectors.shape == (1000, 50) and g.words[0] == "the"


# ------------------------------------------------------------------------------------ MLM queries


def test_build_query_pair_and_masked_only():
    CLS, SEP, MASK = 2, 3, 4
    q = build_query([10, 11, 12], 1, "pair", 64, CLS, SEP, MASK)
    assert q.input_ids == (2, 10, 4, 12, 3, 10, 11, 12, 3)
    assert q.token_type_ids == (0, 0, 0, 0, 0, 1, 1, 1, 1)
    assert q.mask_pos == 2
    q = build_query([10, 11, 12], 0, "masked_only", 64, CLS, SEP, MASK)
    assert (q.input_ids, q.token_type_ids, q.mask_pos) == ((2, 4, 11, 12, 3), (0,) * 5, 1)


def test_build_query_truncation():
    CLS, SEP, MASK = 2, 3, 4
    # pair cut: first segment 5 tokens, room for 2 pieces + [SEP] of the second
    q = build_query([10, 11, 12], 2, "pair", 8, CLS, SEP, MASK)
    assert q.input_ids == (2, 10, 11, 4, 3, 10, 11, 3) and q.mask_pos == 3
    # masked copy alone too long: a window of max_len - 2 pieces centred on the mask
    q = build_query(list(range(10, 30)), 15, "pair", 8, CLS, SEP, MASK)
    assert q.input_ids == (2, 22, 23, 24, 4, 26, 27, 3) and q.mask_pos == 4
    assert q.input_ids[q.mask_pos] == MASK
    q = build_query(list(range(10, 30)), 19, "pair", 8, CLS, SEP, MASK)
    assert q.input_ids == (2, 24, 25, 26, 27, 28, 4, 3) and q.mask_pos == 6


# --------------------------------------------------------------------------------------- masking


def test_mask_tokens_80_10_10():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 100, (400, 50), generator=g)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, 0] = False
    maskable[:, -5:] = False
    random_ids = torch.arange(10, 100)
    masked, sel = mask_tokens(ids, maskable, 4, random_ids, g, rate=0.15)
    assert not sel[~maskable].any() and (masked[~sel] == ids[~sel]).all()
    n = int(sel.sum())
    assert abs(n / int(maskable.sum()) - 0.15) < 0.01
    is_mask = (masked[sel] == 4).float().mean().item()
    kept = (masked[sel] == ids[sel]).float().mean().item()
    assert abs(is_mask - 0.8) < 0.02 and abs(kept - 0.1 - 0.8 * 0) < 0.02 + 1 / 90
    assert ((masked[sel] >= 10) | (masked[sel] == 4)).all()


def test_mask_tokens_selects_at_least_one():
    g = torch.Generator().manual_seed(1)
    ids = torch.full((50, 3), 20)
    maskable = torch.tensor([[False, True, False]] * 50)
    _, sel = mask_tokens(ids, maskable, 4, torch.arange(10, 30), g, rate=1e-6)
    assert sel.sum(dim=1).tolist() == [1] * 50 and sel[:, 1].all()


# ---------------------------------------------------------------------------------------- config


def test_config_defaults_and_table():
    cfg = AugmentConfig()
    cfg.validate()
    assert (cfg.num_candidates, cfg.replace_prob, cfg.resolved_num_new()) == (15, 0.4, 20)
    assert [default_num_new(t) for t in ("cola", "mrpc", "rte", "stsb", "sst2", "qnli", "mnli", "qqp")] == [
        30, 30, 30, 30, 20, 20, 10, 10,
    ]
    assert AugmentConfig(task="wnli", num_new=5).resolved_num_new() == 5


@pytest.mark.parametrize(
    "cfg, path",
    [
        (AugmentConfig(replace_prob=1.5), "augment.replace_prob"),
        (AugmentConfig(num_candidates=0), "augment.num_candidates"),
        (AugmentConfig(task="wnli"), "augment.num_new"),
        (AugmentConfig(candidate_source="bert"), "augment.candidate_source"),
        (AugmentConfig(glove=GloveConfig(format="bin")), "augment.glove.format"),
        (AugmentConfig(mlm=MLMConfig(input="both")), "augment.mlm.input"),
        (AugmentConfig(mlm=MLMConfig(batch_size=0)), "augment.mlm.batch_size"),
        (AugmentConfig(job=JobConfig(on_bad_row="ignore")), "augment.job.on_bad_row"),
        (AugmentConfig(job=JobConfig(shard_index=2, num_shards=2)), "augment.job.shard_index"),
        (AugmentConfig(job=JobConfig(num_workers=0)), "augment.job.num_workers"),
    ],
)
def test_config_errors_name_the_key(cfg, path):
    with pytest.raises(ConfigError) as e:
        cfg.validate("augment")
    assert e.value.path == path
