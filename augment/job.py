"""The augmentation job: chunks, shards, workers, resume, merge and manifest.

Layout on disk (``parts`` = ``job.parts_dir`` or ``<output>.parts``; it must be shared by all ranks)::

    parts/job.json                 what the job is (input sha256, parameters); a restart must match it
    parts/chunk-000012.tsv         rows of chunk 12 (a valid task file, header included), written atomically
    parts/chunk-000012.json        commit marker of chunk 12 (counts, sha256 of the .tsv), written after it
    <output>                       merged file: header + every chunk's rows in input order
    <output>.manifest.json         input sha256, parameters, seed, counts per shard, bad rows

Examples are cut into chunks of ``chunk_size`` in input order; chunk k belongs to shard ``k % num_shards``.
A worker augments a *group* of pending chunks at once (:func:`plan_groups`; one candidate pass, fuller
masked-LM batches) and commits the group's chunks one by one. A chunk counts as done only when its marker
exists, so a job killed at any point and started again redoes at most the chunks in flight, never duplicates
or loses rows. Each example's random stream depends only on (seed, line number), so the result does not
depend on workers, shards, groups or restarts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing as mp
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ds_kdqat.fileio import atomic_write_json, atomic_write_text, atomic_write_via, sha256_file
from ds_kdqat.data.custom import read_described_file
from ds_kdqat.data.files import write_table
from ds_kdqat.data.glue_format import Example, ReadReport, read_task_file, write_task_file
from ds_kdqat.data.tasks import TaskSpec, get_task
from ds_kdqat.errors import ConfigError, DataError

from .config import AugmentConfig
from .tables import augment_spec, augmented_records, check_text_columns, table_format

logger = logging.getLogger(__name__)

JOB_FORMAT = "ds-kdqat-augment-job"
MANIFEST_FORMAT = "ds-kdqat-augment-manifest"


# ----------------------------------------------------------------------------------------------- planning


def shard_from_env(env: Optional[dict] = None) -> tuple[int, int]:
    """(index, count) from RANK/WORLD_SIZE, else SLURM_PROCID/SLURM_NTASKS, else (0, 1)."""
    env = os.environ if env is None else env
    for rank_key, size_key in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_key in env and size_key in env:
            try:
                return int(env[rank_key]), int(env[size_key])
            except ValueError:
                raise ConfigError("augment.job.shard_index", f"{rank_key}={env[rank_key]!r} / {size_key}={env[size_key]!r} are not integers") from None
    return 0, 1


def resolve_shard(cfg: AugmentConfig) -> tuple[int, int]:
    env_index, env_count = shard_from_env()
    count = cfg.job.num_shards if cfg.job.num_shards is not None else env_count
    index = cfg.job.shard_index if cfg.job.shard_index is not None else (env_index if cfg.job.num_shards is None else 0)
    if not 0 <= index < count:
        raise ConfigError("augment.job.shard_index", f"shard {index} is not in [0, {count})")
    return index, count


def default_input(cfg: AugmentConfig, spec: TaskSpec) -> Path:
    """The task's train file: for the embedded task, the materialised default split."""
    if cfg.input is not None:
        return Path(cfg.input)
    if not spec.embedded:
        raise ConfigError("augment.input", f"task {spec.name!r} needs an input file (its {spec.split_files['train']})")
    from ds_kdqat.data.config import DataConfig
    from ds_kdqat.data.loading import task_dir

    return task_dir(DataConfig(task=spec.name)) / spec.split_files["train"]


def default_output(cfg: AugmentConfig, input_path: Path) -> Path:
    if cfg.output is not None:
        return Path(cfg.output)
    return input_path.with_name(f"{input_path.stem}_aug{input_path.suffix or '.tsv'}")


def _file_sha(path: Optional[str]) -> Optional[str]:
    return sha256_file(path) if path is not None and os.path.isfile(path) else None


def job_identity(cfg: AugmentConfig, input_sha256: str) -> dict:
    """Everything the output depends on (not workers, shards, groups or batch size; the masked LM's precision
    does change candidates, so it is recorded)."""
    identity = _identity(cfg, input_sha256)
    if cfg.task == "custom":
        identity["columns"] = {"text": cfg.text_columns, "label": cfg.label_column, "format": cfg.format}
    return identity


def _identity(cfg: AugmentConfig, input_sha256: str) -> dict:
    return {
        "format": JOB_FORMAT,
        "task": cfg.task,
        "input_sha256": input_sha256,
        "num_candidates": cfg.num_candidates,
        "replace_prob": float(cfg.replace_prob),
        "num_new": cfg.resolved_num_new(),
        "seed": cfg.seed,
        "candidate_source": cfg.candidate_source,
        "stopwords_sha256": _file_sha(cfg.stopwords),
        "glove": {"path": cfg.glove.path, "format": cfg.glove.format, "vocab_size": cfg.glove.vocab_size},
        "mlm": {
            "model": cfg.mlm.model,
            "head": cfg.mlm.head,
            "head_sha256": _file_sha(cfg.mlm.head),
            "input": cfg.mlm.input,
            "max_seq_length": cfg.mlm.max_seq_length,
            "precision": cfg.mlm.precision,
        },
        "chunk_size": cfg.job.chunk_size,
        "on_bad_row": cfg.job.on_bad_row,
    }


def _recorded_identity(recorded: dict) -> dict:
    """A ``job.json`` as the current code writes it: one written before ``mlm.precision`` existed ran fp32."""
    mlm = recorded.get("mlm")
    if isinstance(mlm, dict) and "precision" not in mlm:
        recorded = {**recorded, "mlm": {**mlm, "precision": "fp32"}}
    return recorded


@dataclass
class Plan:
    """A resolved job: files, shard, chunks of this shard."""

    cfg: AugmentConfig
    spec: TaskSpec
    input_path: Path
    output_path: Path
    parts_dir: Path
    shard_index: int
    num_shards: int
    examples: list[Example]
    report: ReadReport
    identity: dict
    fmt: Optional[str] = None  # the input's table format for task "custom"; None = the task's GLUE tsv layout

    @property
    def num_chunks(self) -> int:
        return -(-len(self.examples) // self.cfg.job.chunk_size)

    def chunk_examples(self, k: int) -> list[Example]:
        size = self.cfg.job.chunk_size
        return self.examples[k * size : (k + 1) * size]

    def my_chunks(self) -> list[int]:
        return [k for k in range(self.num_chunks) if k % self.num_shards == self.shard_index]

    def chunk_tsv(self, k: int) -> Path:
        return chunk_file(self.parts_dir, k, self.fmt)

    def chunk_marker(self, k: int) -> Path:
        return self.parts_dir / f"chunk-{k:06d}.json"

    def done(self, k: int) -> bool:
        return self.chunk_marker(k).is_file()


def _refuse_foreign_files(output_path: Path, parts: Path, job_file: Path) -> None:
    """A job writes only files it owns: a new job (no ``parts/job.json`` yet) refuses an existing output
    file and a non-empty parts folder, which hold someone else's data; a resumed job rewrites its own."""
    if job_file.is_file():
        return
    if output_path.exists():
        raise ConfigError("augment.output", f"{output_path} exists and was not written by this augmentation job; "
                          "choose another output path (nothing was changed)")
    if parts.is_dir() and any(parts.iterdir()):
        raise ConfigError("augment.job.parts_dir", f"{parts} is not empty and holds no job.json of an augmentation "
                          "job; choose another parts_dir (nothing was changed)")


def make_plan(cfg: AugmentConfig) -> Plan:
    """Validate, read the input (bad rows per ``on_bad_row``), check/record the job identity."""
    cfg.validate("augment")
    spec = augment_spec(cfg.text_columns, cfg.label_column) if cfg.task == "custom" else get_task(cfg.task, "augment.task")
    input_path = default_input(cfg, spec)
    if not input_path.is_file():
        raise ConfigError("augment.input", f"{input_path} does not exist")
    output_path = default_output(cfg, input_path)
    if output_path.resolve() == input_path.resolve():
        raise ConfigError("augment.output", f"the output {output_path} would overwrite the input")
    fmt = table_format(input_path, cfg.format) if cfg.task == "custom" else None
    if fmt is not None:
        if table_format(output_path, cfg.format, "augment.output") != fmt:
            raise ConfigError("augment.output", f"{output_path} is not a {fmt} file like the input")
        examples, report = read_described_file(input_path, spec, fmt, on_bad_row=cfg.job.on_bad_row)
        check_text_columns(spec, report.columns)
    else:
        examples, report = read_task_file(input_path, spec, on_bad_row=cfg.job.on_bad_row)
    for bad in report.bad_rows:
        logger.warning("skipped bad row %s", bad)
    if report.bad_rows:
        logger.warning("%d bad rows skipped in %s", report.skipped, input_path)
    index, count = resolve_shard(cfg)
    parts = Path(cfg.job.parts_dir) if cfg.job.parts_dir is not None else output_path.with_name(output_path.name + ".parts")
    job_file = parts / "job.json"
    _refuse_foreign_files(output_path, parts, job_file)
    parts.mkdir(parents=True, exist_ok=True)
    identity = job_identity(cfg, sha256_file(input_path))
    if job_file.is_file():
        recorded = _recorded_identity(json.loads(job_file.read_text(encoding="utf-8")))
        if recorded != identity:
            diff = sorted(k for k in set(recorded) | set(identity) if recorded.get(k) != identity.get(k))
            raise ConfigError(
                "augment.job.parts_dir",
                f"{parts} holds parts of a different job (differs in: {', '.join(diff)}); "
                "remove that folder or choose another parts_dir",
            )
    else:
        atomic_write_json(job_file, identity)
    return Plan(cfg, spec, input_path, output_path, parts, index, count, examples, report, identity, fmt)


def chunk_file(parts_dir: Path, k: int, fmt: Optional[str]) -> Path:
    """The rows of chunk ``k``: ``chunk-<k>.tsv`` (GLUE layout) or ``.csv`` / ``.jsonl`` (task custom)."""
    return parts_dir / f"chunk-{k:06d}.{fmt or 'tsv'}"


# ------------------------------------------------------------------------------------------------- rows


def augmented_rows(example: Example, columns: Sequence[str], spec: TaskSpec, new_texts: Sequence[Sequence[str]]) -> list[list[str]]:
    """The original row, then for each text field its new texts, the other field kept original."""
    rows = [list(example.row)]
    for field_name, texts in zip(spec.text_fields, new_texts):
        col = list(columns).index(field_name)
        for text in texts:
            row = list(example.row)
            row[col] = text
            rows.append(row)
    return rows


def _fields(example: Example) -> list[str]:
    return [example.text_a] if example.text_b is None else [example.text_a, example.text_b]


def commit_chunk(plan_info: dict, k: int, examples: Sequence[Example], new: Sequence[Sequence[Sequence[str]]]) -> dict:
    """Write chunk ``k``'s rows (each example, then its new texts ``new[i]`` per field) atomically, then its
    marker. Returns the marker's content."""
    parts = Path(plan_info["parts_dir"])
    fmt = plan_info.get("format")
    tsv = chunk_file(parts, k, fmt)
    rows: list = []
    if fmt is not None:  # task custom: a CSV / TSV / JSON Lines table
        for example, texts in zip(examples, new):
            rows.extend(augmented_records(example, plan_info["text_fields"], texts))
        write_table(tsv, fmt, plan_info["columns"], rows)
    else:
        spec = get_task(plan_info["task"])
        for example, texts in zip(examples, new):
            rows.extend(augmented_rows(example, plan_info["columns"], spec, texts))
        write_task_file(tsv, spec, rows, header=plan_info["header"])
    marker = {
        "chunk": k,
        "shard": plan_info["shard_index"],
        "num_shards": plan_info["num_shards"],
        "examples": len(examples),
        "rows": len(rows),
        "first_line": examples[0].line,
        "last_line": examples[-1].line,
        "sha256": sha256_file(tsv),
    }
    atomic_write_text(parts / f"chunk-{k:06d}.json", json.dumps(marker, sort_keys=True) + "\n")
    return marker


def process_group(plan_info: dict, group: Sequence[tuple[int, Sequence[Example]]], augmenter) -> list[dict]:
    """Augment the chunks ``group`` = [(k, examples), …] in one candidate pass (one pool of masked-LM queries and
    GloVe words for all their sentences), then commit each chunk on its own, in order. A kill part-way leaves
    the committed chunks done and the others pending. Returns the markers."""
    examples = [e for _, chunk in group for e in chunk]
    new = augmenter.augment([_fields(e) for e in examples], [e.line for e in examples], plan_info["seed"])
    markers, pos = [], 0
    for k, chunk in group:
        markers.append(commit_chunk(plan_info, k, chunk, new[pos : pos + len(chunk)]))
        pos += len(chunk)
    return markers


def process_chunk(plan_info: dict, k: int, examples: Sequence[Example], augmenter) -> dict:
    """Augment one chunk and commit it (tsv, then marker). Returns the marker's content."""
    return process_group(plan_info, [(k, examples)], augmenter)[0]


#: auto ``chunks_per_group``: a group holds up to this many examples
GROUP_EXAMPLES = 256


def plan_groups(pending: Sequence[int], chunk_size: int, chunks_per_group: Optional[int], num_workers: int) -> list[list[int]]:
    """Cut the pending chunks (in order) into the groups a worker augments together.

    Guided sizes: each group takes ``min(g, ceil(remaining / (2 · num_workers)))`` chunks, ``g`` =
    ``chunks_per_group`` or, when None, ``max(1, GROUP_EXAMPLES // chunk_size)``. Large groups come first (fuller
    length-sorted batches), single chunks last, so that no worker is left with a large group at the end.
    """
    cap = chunks_per_group if chunks_per_group is not None else max(1, GROUP_EXAMPLES // chunk_size)
    groups: list[list[int]] = []
    start = 0
    while start < len(pending):
        remaining = len(pending) - start
        size = max(1, min(cap, -(-remaining // (2 * num_workers))))
        groups.append(list(pending[start : start + size]))
        start += size
    return groups


# ---------------------------------------------------------------------------------------------- workers

_WORKER: dict = {}


def _portable_error(exc: BaseException) -> BaseException:
    """What a worker reports for ``exc`` (as a value: a Pool initializer that raises makes the pool restart workers
    forever): our ConfigError/DataError themselves (they pickle with their fields), anything else as a
    RuntimeError naming its type and message (an arbitrary exception need not unpickle)."""
    if isinstance(exc, (ConfigError, DataError)):
        return exc
    return RuntimeError(f"augmentation worker failed: {type(exc).__name__}: {exc}")


def _worker_init(cfg_dict: dict, threads: int) -> None:
    """Pool initializer: build the augmenter once per worker process (kept for every group it runs). The worker
    keeps freed tensor memory for its next batches (:func:`ds_kdqat.allocator.retain_freed_memory`)."""
    try:
        import torch

        from ds_kdqat.allocator import retain_freed_memory

        retain_freed_memory()
        torch.set_num_threads(threads)
        from .build import build_augmenter

        _WORKER["augmenter"] = build_augmenter(config_from_dict(cfg_dict))
    except Exception as exc:  # reported by the first group this worker is given
        _WORKER["error"] = _portable_error(exc)


def _worker_run(args) -> dict:
    """One group in a worker: ``{"markers": [...]}`` or ``{"error": exception}`` (:func:`_portable_error`)."""
    if "error" in _WORKER:
        return {"error": _WORKER["error"]}
    plan_info, group = args
    try:
        return {"markers": process_group(plan_info, group, _WORKER["augmenter"])}
    except Exception as exc:
        return {"error": _portable_error(exc)}


def config_from_dict(d: dict) -> AugmentConfig:
    from .config import GloveConfig, JobConfig, MLMConfig

    d = dict(d)
    return AugmentConfig(
        **{k: v for k, v in d.items() if k not in ("glove", "mlm", "job")},
        glove=GloveConfig(**d["glove"]),
        mlm=MLMConfig(**d["mlm"]),
        job=JobConfig(**d["job"]),
    )


@dataclass
class ShardResult:
    shard_index: int
    num_shards: int
    chunks_done: int
    chunks_run: int
    merged: Optional[Path]


def run_shard(cfg: AugmentConfig, augmenter=None) -> ShardResult:
    """Run this shard's pending chunks (``num_workers`` processes), then merge if every chunk is done.

    ``augmenter``: an already built augmenter for the in-process path (``num_workers == 1``); built from
    ``cfg`` when None.
    """
    plan = make_plan(cfg)
    mine = plan.my_chunks()
    pending = [k for k in mine if not plan.done(k)]
    info = {
        "task": plan.spec.name,
        "seed": cfg.seed,
        "columns": plan.report.columns,
        "header": plan.report.header,
        "format": plan.fmt,
        "text_fields": list(plan.spec.text_fields),
        "parts_dir": str(plan.parts_dir),
        "shard_index": plan.shard_index,
        "num_shards": plan.num_shards,
    }
    total = sum(len(plan.chunk_examples(k)) for k in mine)
    done_examples = total - sum(len(plan.chunk_examples(k)) for k in pending)
    logger.info(
        "shard %d/%d: %d of %d chunks to do (%d done before)",
        plan.shard_index, plan.num_shards, len(pending), len(mine), len(mine) - len(pending),
    )
    bar = _progress(cfg, total, done_examples, f"augment {plan.shard_index}/{plan.num_shards}")
    groups = plan_groups(pending, cfg.job.chunk_size, cfg.job.chunks_per_group, cfg.job.num_workers)
    work = [[(k, plan.chunk_examples(k)) for k in group] for group in groups]
    if work and augmenter is None:
        _check_precision_here(cfg)  # before any model loads, here or in a worker
    if work and cfg.job.num_workers == 1:
        if augmenter is None:
            from .build import build_augmenter

            augmenter = build_augmenter(cfg)
        for group in work:
            for marker in process_group(info, group, augmenter):
                bar.update(marker["examples"])
    elif work:
        processes = min(cfg.job.num_workers, len(work))
        threads = max(1, (os.cpu_count() or 1) // processes)
        ctx = mp.get_context("spawn")
        with ctx.Pool(processes, _worker_init, (dataclasses.asdict(cfg), threads)) as pool:
            for result in pool.imap_unordered(_worker_run, [(info, group) for group in work]):
                if "error" in result:
                    raise result["error"]
                for marker in result["markers"]:
                    bar.update(marker["examples"])
    bar.close()
    merged = None
    if cfg.job.merge:
        if all(plan.done(k) for k in range(plan.num_chunks)):
            merged = merge(plan)
        else:
            logger.info("shard %d done; other shards still running: the last one merges", plan.shard_index)
    return ShardResult(plan.shard_index, plan.num_shards, len(mine), len(pending), merged)


def _check_precision_here(cfg: AugmentConfig) -> None:
    """Refuse ``int8_dynamic`` where it cannot run before any worker starts (a worker would load the model first)."""
    if cfg.candidate_source != "glove" and cfg.mlm.precision == "int8_dynamic":
        from .int8 import check_int8_dynamic
        from .mlm import resolve_device

        check_int8_dynamic(resolve_device(cfg.mlm.device))


def _progress(cfg: AugmentConfig, total: int, initial: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="ex", disable=not cfg.job.progress, file=sys.stderr)


# ------------------------------------------------------------------------------------------------ merge


def merge(plan: Plan) -> Path:
    """Concatenate every chunk's rows in input order into the output (streamed, atomic) + manifest."""
    markers = []
    for k in range(plan.num_chunks):
        if not plan.done(k):
            raise DataError(str(plan.chunk_marker(k)), "chunk not done yet: run the remaining shards first")
        marker = json.loads(plan.chunk_marker(k).read_text(encoding="utf-8"))
        if sha256_file(plan.chunk_tsv(k)) != marker["sha256"]:
            raise DataError(str(plan.chunk_tsv(k)), "content does not match its marker's sha256; delete both and rerun")
        markers.append(marker)
    out = plan.output_path
    digest = hashlib.sha256()

    def concatenate(tmp: str) -> None:
        with open(tmp, "wb") as dst:
            for k in range(plan.num_chunks):
                with open(plan.chunk_tsv(k), "rb") as src:
                    if k > 0 and plan.report.header is not None:
                        src.readline()
                    while block := src.read(1 << 20):
                        dst.write(block)
                        digest.update(block)

    atomic_write_via(out, concatenate)
    per_shard: dict[str, dict] = {}
    for m in markers:
        s = per_shard.setdefault(str(m["shard"]), {"chunks": 0, "examples": 0, "rows": 0})
        s["chunks"] += 1
        s["examples"] += m["examples"]
        s["rows"] += m["rows"]
    manifest = {
        "format": MANIFEST_FORMAT,
        "input": str(plan.input_path),
        "output": str(out),
        "output_sha256": digest.hexdigest(),
        "parameters": plan.identity,
        "seed": plan.cfg.seed,
        "counts": {
            "input_rows": plan.report.rows,
            "examples": len(plan.examples),
            "bad_rows_skipped": plan.report.skipped,
            "output_rows": sum(m["rows"] for m in markers),
            "new_rows": sum(m["rows"] for m in markers) - len(plan.examples),
            "chunks": plan.num_chunks,
        },
        "per_shard": per_shard,
        "bad_rows": [str(b) for b in plan.report.bad_rows],
    }
    atomic_write_json(manifest_path(out), manifest)
    logger.info("wrote %s (%d rows) and its manifest", out, manifest["counts"]["output_rows"])
    return out


def manifest_path(output: Path) -> Path:
    return output.with_name(output.name + ".manifest.json")


def merge_only(cfg: AugmentConfig) -> Path:
    """Merge the parts of a finished job (all shards done)."""
    return merge(make_plan(cfg))
