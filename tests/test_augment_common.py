"""Shared tiny fixtures for the augmentation tests (no tests here).

A tiny WordPiece vocabulary, a random 2-layer BERT masked LM saved as a model directory, and a GloVe text
file with hand-chosen vectors whose cosine neighbours are known.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]", "[unused1]"]
WORDS = [
    "the", "a", "is", "and", "it", "not", "this", "of", "movie", "film", "story", "plot", "actor", "good",
    "great", "bad", "fun", "dull", "funny", "boring", "long", "short", "very", "really", "cast", "music",
    "scene", "ending", "script", "director", "un", "wonder", "charm", "!", ",", ".", "'", "t", "isn",
]
PIECES = ["##believ", "##able", "##ful", "##ing", "##s", "##ly"]
VOCAB = SPECIALS + WORDS + PIECES

# GloVe test vectors (3-d). Cosines are easy to compute by hand.
# the sentences of a tiny sentiment train file (SST-2 layout) the augmentation tests share
SST_ROWS = [
    "The unbelievable movie isn't wonderful!",
    "a very funny film , really good music and a great cast .",
    "Boring plot, dull actor; the ending is long.",
    "it is a charming story",
    "the script is not good and the music is bad",
    "a long movie with a short ending",
    "really great actor , really dull director",
]

GLOVE_ROWS = {
    "unbelievable": [1.0, 0.0, 0.0],
    "incredible": [0.9, 0.1, 0.0],
    "amazing": [0.8, 0.3, 0.0],
    "wonderful": [0.0, 1.0, 0.0],
    "charming": [0.1, 0.9, 0.1],
    "lovely": [0.0, 0.8, 0.4],
    "movie": [0.0, 0.0, 1.0],
    "film": [0.0, 0.1, 0.9],
    "zero": [0.0, 0.0, 0.0],
}


def tiny_tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab={t: i for i, t in enumerate(VOCAB)})


def write_glove_text(path: Path) -> Path:
    path.write_text("".join(f"{w} {' '.join(str(x) for x in v)}\n" for w, v in GLOVE_ROWS.items()), encoding="utf-8")
    return path


def tiny_mlm_dir(path: Path, seed: int = 0) -> Path:
    """A random tiny BertForMaskedLM + tokenizer saved in ``path``."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64,
    )
    model = BertForMaskedLM(cfg)
    # a larger output bias spread keeps the top-M ranking clear of float noise
    with torch.no_grad():
        model.cls.predictions.bias.copy_(torch.randn(len(VOCAB)) * 3)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def tiny_encoder_dir(path: Path, seed: int = 0) -> Path:
    """A random tiny BertModel (no masked-LM head) + tokenizer saved in ``path``."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64,
    )
    BertModel(cfg).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
