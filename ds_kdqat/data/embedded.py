"""The embedded default task ``rt_polarity``: 4,000 Rotten Tomatoes sentences from Debian's python3-pattern.

Source file: ``polarity-en-pang&lee2.csv`` of the ``python3-pattern`` package (``test/corpora``): a UTF-8
CSV with a byte-order mark, rows ``"label","text"``, label ``1`` (positive) or ``-1`` (negative); texts may
hold doubled quotes and end with a line break inside the quotes, so one row spans two physical lines.

:func:`materialize_rt_polarity` parses it strictly, maps ``1 -> "1"`` and ``-1 -> "0"``, collapses every
run of whitespace (tabs and line breaks included) to one space, splits it deterministically and stratified
by label into train and dev, and writes ``train.tsv`` / ``dev.tsv`` in the SST-2 layout (header
``sentence<TAB>label``) plus a ``manifest.json`` that lets a later call skip the work.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ds_kdqat.fileio import PathLike, atomic_write_text, sha256_file
from ds_kdqat.data.glue_format import write_task_file
from ds_kdqat.data.tasks import get_task
from ds_kdqat.errors import DataError

logger = logging.getLogger(__name__)

RT_POLARITY_FILE = "polarity-en-pang&lee2.csv"
ENV_VAR = "KDQAT_RT_POLARITY_CSV"
SYSTEM_CORPORA_DIR = Path("/usr/share/doc/python3-pattern/test/corpora")
PACKAGE_CORPORA_SUBDIR = Path("python3-pattern/usr/share/doc/python3-pattern/test/corpora")
FETCH_SCRIPT = "scripts/fetch_embedded_data.sh"

DEFAULT_DEV_FRACTION = 0.1
DEFAULT_SPLIT_SEED = 42
MANIFEST = "manifest.json"
_MANIFEST_FORMAT = 1
_LABELS = {"1": "1", "-1": "0"}


class EmbeddedDataMissing(DataError):
    """The embedded CSV is in none of the places looked at; the message says how to get it."""


@dataclass(frozen=True)
class LabelledSentence:
    """One parsed row: raw label mapped to ``"0"``/``"1"``, whitespace-normalised text, first line of the row."""

    label: str
    text: str
    line: int


def project_root() -> Path:
    """The source checkout holding this package (``<repo>``)."""
    return Path(__file__).resolve().parents[2]


def project_data_cache() -> Path:
    """``<repo>/.cache/data``: where the fetch script unpacks the package and the default split lands."""
    return project_root() / ".cache" / "data"


def candidate_paths(cache_dir: Optional[PathLike] = None) -> list[Path]:
    """Where the CSV is looked for, in order (the env var first when set)."""
    cache = Path(cache_dir) if cache_dir is not None else project_data_cache()
    paths = []
    env = os.environ.get(ENV_VAR)
    if env:
        paths.append(Path(env) / RT_POLARITY_FILE if Path(env).is_dir() else Path(env))
    paths.append(SYSTEM_CORPORA_DIR / RT_POLARITY_FILE)
    paths.append(cache / PACKAGE_CORPORA_SUBDIR / RT_POLARITY_FILE)
    return paths


def find_rt_polarity_csv(cache_dir: Optional[PathLike] = None) -> Path:
    """The first existing file of :func:`candidate_paths`.

    When ``$KDQAT_RT_POLARITY_CSV`` is set it must name the file (or a directory holding it): a wrong
    setting is an error rather than a silent fall-back to another copy.

    Raises:
        EmbeddedDataMissing: with the places looked at and how to get the file.
    """
    paths = candidate_paths(cache_dir)
    env = os.environ.get(ENV_VAR)
    if env and not paths[0].is_file():
        raise EmbeddedDataMissing(ENV_VAR, f"is set to {env!r}, which is not {RT_POLARITY_FILE!r} nor a folder holding it")
    for path in paths:
        if path.is_file():
            return path
    looked = "; ".join(str(p) for p in paths)
    raise EmbeddedDataMissing(
        RT_POLARITY_FILE,
        "the embedded default data (Debian package python3-pattern) was not found; looked in: "
        f"{looked}. Get it with `{FETCH_SCRIPT}` (apt-get download + dpkg -x into "
        f"<repo>/.cache/data/python3-pattern, no system install), or set {ENV_VAR} to the file. "
        "With internet access, task 'sst2' with source 'hub' is the alternative.",
    )


def parse_rt_polarity_csv(path: PathLike) -> list[LabelledSentence]:
    """Parse the CSV strictly.

    Every row must have exactly two fields, label ``1`` or ``-1`` and a non-empty text; the CSV quoting must
    be well formed. Labels become ``"1"`` / ``"0"``; text whitespace runs become single spaces.

    Raises:
        DataError: ``file:line`` (first line of the offending row) for a bad row or bad UTF-8, ``file`` for a
            file without rows.
    """
    path_str = str(path)
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path_str}:{line}", f"not valid UTF-8 ({exc.reason})") from None

    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[LabelledSentence] = []
    next_line = 1
    while True:
        start = next_line
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DataError(f"{path_str}:{start}", f"malformed CSV: {exc}") from None
        next_line = reader.line_num + 1
        if not record:
            raise DataError(f"{path_str}:{start}", "blank line")
        if len(record) != 2:
            raise DataError(f"{path_str}:{start}", f"expected 2 fields (label, text), found {len(record)}")
        raw_label, raw_text = record[0].strip(), record[1]
        if raw_label not in _LABELS:
            raise DataError(f"{path_str}:{start}", f"unknown label {raw_label!r} (allowed: '1', '-1')")
        sentence = " ".join(raw_text.split())
        if not sentence:
            raise DataError(f"{path_str}:{start}", "empty text")
        rows.append(LabelledSentence(_LABELS[raw_label], sentence, start))
    if not rows:
        raise DataError(path_str, "no rows")
    return rows


def _order_key(seed: int, text: str, index: int) -> tuple[bytes, int]:
    # A hash of (seed, text) is stable across Python/numpy versions and platforms, unlike a seeded RNG
    # stream; the index breaks ties between duplicate sentences.
    return hashlib.sha256(f"{seed}\x00{text}".encode("utf-8")).digest(), index


def stratified_split(
    labels: Sequence[str], texts: Sequence[str], dev_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Deterministic stratified split into (train indices, dev indices).

    Within each label the items are ordered by a seeded hash of their text; the first
    ``round(count · dev_fraction)`` (halves rounded up) go to dev. Both returned lists are in that hashed
    order, so labels are interleaved (a first-N subset is not one class).

    Raises:
        ValueError: ``dev_fraction`` outside (0, 1), or a split that would be empty.
    """
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction}")
    if len(labels) != len(texts):
        raise ValueError("labels and texts differ in length")
    keys = [_order_key(seed, text, i) for i, text in enumerate(texts)]
    dev: list[int] = []
    train: list[int] = []
    for label in sorted(set(labels)):
        members = sorted((i for i, lab in enumerate(labels) if lab == label), key=keys.__getitem__)
        n_dev = math.floor(len(members) * dev_fraction + 0.5)
        dev.extend(members[:n_dev])
        train.extend(members[n_dev:])
    if not dev or not train:
        raise ValueError(f"dev_fraction {dev_fraction} of {len(labels)} items leaves an empty split")
    return sorted(train, key=keys.__getitem__), sorted(dev, key=keys.__getitem__)


def _manifest_matches(out_dir: Path, wanted: dict) -> bool:
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if any(manifest.get(key) != value for key, value in wanted.items()):
        return False
    for split in ("train", "dev"):
        path = out_dir / f"{split}.tsv"
        if not path.is_file() or sha256_file(path) != manifest.get(f"{split}_sha256"):
            return False
    return True


def materialize_rt_polarity(
    out_dir: PathLike,
    csv_path: Optional[PathLike] = None,
    dev_fraction: float = DEFAULT_DEV_FRACTION,
    seed: int = DEFAULT_SPLIT_SEED,
) -> Path:
    """Write ``train.tsv`` and ``dev.tsv`` (SST-2 layout) of the embedded task into ``out_dir``.

    Nothing is rewritten when ``out_dir/manifest.json`` records the same source checksum, seed and
    fraction and both files still have the checksums it records. When the CSV cannot be found but such
    a split is already there (same seed and fraction), that split is used as is. Each file is written
    atomically and the manifest last, so an interrupted call is redone by the next one; concurrent calls
    write identical bytes.

    Args:
        out_dir: destination folder (created).
        csv_path: the CSV; default :func:`find_rt_polarity_csv`.
        dev_fraction: share of each label that goes to dev (default 0.1: 3,600 / 400 of the 4,000).
        seed: split seed.

    Returns ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    settings = {"format": _MANIFEST_FORMAT, "split_seed": seed, "dev_fraction": dev_fraction}
    try:
        source = Path(csv_path) if csv_path is not None else find_rt_polarity_csv()
    except EmbeddedDataMissing:
        if _manifest_matches(out, settings):
            logger.info("rt_polarity: source CSV not found, using the split already in %s", out)
            return out
        raise
    wanted = {**settings, "source_sha256": sha256_file(source)}
    if _manifest_matches(out, wanted):
        return out

    sentences = parse_rt_polarity_csv(source)
    train_idx, dev_idx = stratified_split(
        [s.label for s in sentences], [s.text for s in sentences], dev_fraction, seed
    )
    spec = get_task("rt_polarity")
    header = [spec.text_fields[0], spec.label_field]
    manifest = dict(wanted, source=str(source))
    for split, indices in (("train", train_idx), ("dev", dev_idx)):
        path = out / f"{split}.tsv"
        write_task_file(path, spec, ([sentences[i].text, sentences[i].label] for i in indices), header=header)
        manifest[f"{split}_rows"] = len(indices)
        manifest[f"{split}_sha256"] = sha256_file(path)
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    logger.info("rt_polarity: wrote %d train / %d dev sentences to %s", len(train_idx), len(dev_idx), out)
    return out
