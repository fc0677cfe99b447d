"""One-sentence-at-a-time implementation of the same algorithm, shaped like the published script.

Per sentence and per eligible word: re-tokenize the sentence, find the word's pieces by scanning for
``##`` continuations; a one-piece word gets one masked-LM forward over the whole input with logits at every
position, and a full sort of the vocabulary; a multi-piece word gets one dot product against every GloVe
vector and a full sort. No batching, no caching. It exists to check the batched :class:`Augmenter` (same
output for the same seed) and as the speed baseline in ``bench/bench_augment.py``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .augmenter import AugmentParams
from .glove import GloveVectors
from .mlm import MaskedLM, build_query
from .sampling import draw_sentences, example_rng
from .words import WordSplitter, is_eligible


class ReferenceAugmenter:
    def __init__(
        self,
        splitter: WordSplitter,
        stopwords: frozenset[str],
        params: AugmentParams,
        glove: Optional[GloveVectors],
        masked_lm: Optional[MaskedLM],
    ):
        self.splitter = splitter
        self.stopwords = stopwords
        self.params = params
        self.masked_lm = masked_lm
        if glove is not None:
            vectors = glove.vectors.astype(np.float32)
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            self.unit = vectors / np.where(norms > 0, norms, 1.0)
            self.glove_words = glove.words
            self.glove_index = {}
            for i, w in enumerate(glove.words):
                self.glove_index.setdefault(w, i)

    def _glove(self, word: str) -> list[str]:
        if word not in self.glove_index:
            return []
        i = self.glove_index[word]
        sims = self.unit @ self.unit[i]
        sims[i] = -np.inf
        order = np.argsort(-sims, kind="stable")[: self.params.num_candidates]
        return [self.glove_words[k] for k in order]

    def _mlm(self, text: str, word_index: int) -> list[str]:
        lm = self.masked_lm
        tokens = self.splitter.tokenizer.tokenize(text)
        starts = [k for k, t in enumerate(tokens) if not t.startswith(self.splitter.subword_prefix)]
        q = starts[word_index]
        ids = self.splitter.tokenizer.convert_tokens_to_ids(tokens)
        max_len = min(self.params.max_seq_length, lm.max_positions)
        query = build_query(ids, q, self.params.mlm_input, max_len, lm.cls_id, lm.sep_id, lm.mask_id)
        logits = lm.full_logits(query)[query.mask_pos].float()
        order = torch.argsort(logits, descending=True).tolist()
        excluded = lm.excluded
        out = []
        for t in order:
            if not excluded[t]:
                out.append(lm.id_to_token[t])
                if len(out) == self.params.num_candidates:
                    break
        return out

    def candidates(self, text: str) -> tuple[list[str], dict[int, list[str]]]:
        words = list(self.splitter.words(text))
        table: dict[int, list[str]] = {}
        source = self.params.candidate_source
        for j, word in enumerate(words):
            if not is_eligible(word, self.stopwords):
                continue
            pieces = self.splitter.tokenizer.tokenize(word)
            single = len(pieces) == 1
            if source == "glove" or (source == "mlm_glove" and not single):
                cands = self._glove(word)
            elif single:
                cands = self._mlm(text, j)
            else:
                continue
            table[j] = cands or [word]
        return words, table

    def augment_one(self, fields: Sequence[str], seed: int, index: int) -> list[list[str]]:
        rng = example_rng(seed, index)
        out = []
        for text in fields:
            words, table = self.candidates(text)
            out.append(draw_sentences(words, table, self.params.replace_prob, self.params.num_new, rng))
        return out
