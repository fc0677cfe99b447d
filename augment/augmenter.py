"""The batched augmenter: candidate tables for many sentences at once, then the per-example draws.

For a block of sentences, every eligible word of every sentence is collected first; GloVe neighbours are
fetched for all multi-piece words in batched matmuls (and cached per word), and one masked copy per eligible
single-piece word is built and run through the masked LM in length-sorted batches. Then each example draws
its new sentences from its own random stream (:func:`augment.sampling.example_rng`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from .glove import GloveNeighbours
from .mlm import MaskedLM, build_query
from .sampling import draw_sentences, example_rng
from .words import SplitSentence, WordSplitter, is_eligible


#: masked copies per forward pass when ``batch_size`` is None. On the CPU smaller batches stay in cache: for
#: MiniLM-L6 on a 2-core EPYC, 32 took 10-17 % less CPU time than 64 (16: as 32); on CUDA, as before.
DEFAULT_BATCH_SIZE = {"cpu": 32, "cuda": 64}


def default_batch_size(device) -> int:
    """:data:`DEFAULT_BATCH_SIZE` for ``device`` (a torch.device); 64 for any other device type."""
    return DEFAULT_BATCH_SIZE.get(device.type, 64)


@dataclass(frozen=True)
class AugmentParams:
    """M, p, N and how masked-LM inputs are built (see :class:`augment.config.AugmentConfig`)."""

    num_candidates: int = 15
    replace_prob: float = 0.4
    num_new: int = 20
    candidate_source: str = "mlm_glove"
    mlm_input: str = "pair"
    batch_size: Optional[int] = None  # None: default_batch_size(device of the masked LM)
    max_seq_length: int = 512


@dataclass
class CandidateTable:
    """A split sentence and the candidate list of each eligible word position (best first)."""

    sentence: SplitSentence
    candidates: dict[int, list[str]]


def word_route(sentence: SplitSentence, j: int, stopwords: frozenset[str], source: str) -> Optional[str]:
    """Where word j's candidates come from: ``"mlm"``, ``"glove"`` or None (word left alone)."""
    if not is_eligible(sentence.words[j], stopwords):
        return None
    single = len(sentence.pieces[j]) == 1
    if source == "glove":
        return "glove"
    if source == "mlm":
        return "mlm" if single else None
    return "mlm" if single else "glove"


def _by_sentence(jobs: Sequence[tuple[int, int]]) -> list[tuple[int, list[int]]]:
    """``[(s, j), …]`` (grouped by s, in order) → ``[(s, [j, …]), …]``, order kept."""
    out: list[tuple[int, list[int]]] = []
    for s, j in jobs:
        if out and out[-1][0] == s:
            out[-1][1].append(j)
        else:
            out.append((s, [j]))
    return out


class Augmenter:
    """Turns texts into candidate tables and examples into new texts; ``masked_lm`` may be None when
    ``candidate_source == "glove"``."""

    def __init__(
        self,
        splitter: WordSplitter,
        stopwords: frozenset[str],
        params: AugmentParams,
        glove: Optional[GloveNeighbours],
        masked_lm: Optional[MaskedLM],
    ):
        if params.candidate_source != "mlm" and glove is None:
            raise ValueError(f"candidate_source {params.candidate_source!r} needs GloVe vectors")
        if params.candidate_source != "glove" and masked_lm is None:
            raise ValueError(f"candidate_source {params.candidate_source!r} needs a masked LM")
        self.splitter = splitter
        self.stopwords = stopwords
        self.params = params
        self.glove = glove
        self.masked_lm = masked_lm

    def _queries(self, sentence: SplitSentence, word_indices: Sequence[int]) -> list:
        """One masked copy per word of ``word_indices`` (single-piece words), the flat piece list built once."""
        flat = [i for ps in sentence.pieces for i in ps]
        starts = [0]
        for ps in sentence.pieces:
            starts.append(starts[-1] + len(ps))
        lm = self.masked_lm
        max_len = min(self.params.max_seq_length, lm.max_positions)
        mode = self.params.mlm_input
        return [build_query(flat, starts[j], mode, max_len, lm.cls_id, lm.sep_id, lm.mask_id) for j in word_indices]

    def candidate_tables(self, texts: Sequence[str]) -> list[CandidateTable]:
        """One table per text; all GloVe and masked-LM look-ups of the block are batched together."""
        splits = self.splitter.split_many(texts)
        glove_jobs: list[tuple[int, int]] = []
        mlm_jobs: list[tuple[int, int]] = []
        for s, sentence in enumerate(splits):
            for j in range(len(sentence.words)):
                route = word_route(sentence, j, self.stopwords, self.params.candidate_source)
                if route == "glove":
                    glove_jobs.append((s, j))
                elif route == "mlm":
                    mlm_jobs.append((s, j))
        tables = [CandidateTable(sentence, {}) for sentence in splits]
        if glove_jobs:
            found = self.glove.many([splits[s].words[j] for s, j in glove_jobs])
            for (s, j), cands in zip(glove_jobs, found):
                tables[s].candidates[j] = cands
        if mlm_jobs:
            queries = []
            for s, words in _by_sentence(mlm_jobs):
                queries.extend(self._queries(splits[s], words))
            batch_size = self.params.batch_size or default_batch_size(self.masked_lm.device)
            found = self.masked_lm.candidates(queries, self.params.num_candidates, batch_size)
            for (s, j), cands in zip(mlm_jobs, found):
                tables[s].candidates[j] = cands
        for t in tables:  # a word with no candidate (e.g. not in GloVe) keeps itself, as published
            for j, cands in t.candidates.items():
                if not cands:
                    t.candidates[j] = [t.sentence.words[j]]
        return tables

    def draw(self, tables: Sequence[CandidateTable], seed: int, index: int) -> list[list[str]]:
        """New texts for the fields of example ``index`` (one table per field, drawn in field order)."""
        rng = example_rng(seed, index)
        p, n = self.params.replace_prob, self.params.num_new
        return [draw_sentences(t.sentence.words, t.candidates, p, n, rng) for t in tables]

    def augment(self, examples: Sequence[Sequence[str]], indices: Sequence[int], seed: int) -> list[list[list[str]]]:
        """``examples[k]`` = the texts (1 or 2 fields) of example ``indices[k]`` → new texts per field."""
        flat = [text for fields in examples for text in fields]
        tables = self.candidate_tables(flat)
        out, pos = [], 0
        for fields, index in zip(examples, indices):
            out.append(self.draw(tables[pos : pos + len(fields)], seed, index))
            pos += len(fields)
        return out
