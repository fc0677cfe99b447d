"""Word splitting and word pieces, the way BERT's tokenizer sees a sentence.

A sentence is normalised (lower-casing, accent stripping, control-character clean-up) and split on
whitespace and punctuation by the tokenizer's own normaliser and pre-tokenizer (BERT's "basic
tokenization"); each word is then cut into WordPiece pieces. A word is *eligible* for replacement when it is
alphabetic and not a stop word; eligible words of one piece get masked-LM candidates, words of several
pieces get GloVe candidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ds_kdqat.errors import ConfigError


@dataclass(frozen=True)
class SplitSentence:
    """``words[j]`` is the j-th normalised word; ``pieces[j]`` its WordPiece ids (at least one)."""

    words: tuple[str, ...]
    pieces: tuple[tuple[int, ...], ...]

    def text(self) -> str:
        """The normalised sentence: words joined by single spaces."""
        return " ".join(self.words)


def is_eligible(word: str, stopwords: frozenset[str]) -> bool:
    """True when ``word`` may be replaced: alphabetic and not a stop word."""
    return word.isalpha() and word not in stopwords


class WordSplitter:
    """Splits text into words and word pieces with a WordPiece (BERT-family) fast tokenizer.

    Word pieces are cached per word (corpora repeat words a lot), so splitting is cheap after warm-up.
    """

    def __init__(self, tokenizer):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        model = getattr(backend, "model", None)
        if backend is None or type(model).__name__ != "WordPiece":
            raise ConfigError(
                "augment.mlm.model",
                f"augmentation needs a WordPiece (BERT-family) fast tokenizer; got {type(tokenizer).__name__}"
                + (f" with a {type(model).__name__} model" if model is not None else ""),
            )
        self.tokenizer = tokenizer
        self._normalizer = backend.normalizer
        self._pre_tokenizer = backend.pre_tokenizer
        self._model = model
        self.subword_prefix: str = model.continuing_subword_prefix
        self.unk_token: str = model.unk_token
        self._vocab: dict[str, int] = tokenizer.get_vocab()
        self._unk_id = self._vocab[self.unk_token]
        self._cache: dict[str, tuple[int, ...]] = {}

    def words(self, text: str) -> tuple[str, ...]:
        """Normalised words of ``text`` (BERT basic tokenization)."""
        if self._normalizer is not None:
            text = self._normalizer.normalize_str(text)
        if self._pre_tokenizer is None:
            return tuple(text.split())
        return tuple(w for w, _ in self._pre_tokenizer.pre_tokenize_str(text))

    def word_pieces(self, word: str) -> tuple[int, ...]:
        """WordPiece ids of one normalised word (``[UNK]`` alone when it cannot be split)."""
        ids = self._cache.get(word)
        if ids is None:
            ids = tuple(self._vocab.get(t.value, self._unk_id) for t in self._model.tokenize(word)) or (self._unk_id,)
            self._cache[word] = ids
        return ids

    def split(self, text: str) -> SplitSentence:
        words = self.words(text)
        return SplitSentence(words, tuple(self.word_pieces(w) for w in words))

    def split_many(self, texts: Sequence[str]) -> list[SplitSentence]:
        return [self.split(t) for t in texts]
