"""The augmentation job end to end on tiny inputs: counts, pairs, determinism, shards, resume, bad rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from augment.config import AugmentConfig, GloveConfig, JobConfig, MLMConfig
from augment.job import manifest_path, run_shard, shard_from_env
from ds_kdqat.data.glue_format import read_task_file
from ds_kdqat.data.tasks import get_task
from ds_kdqat.errors import ConfigError, DataError
from test_augment_common import SST_ROWS, tiny_mlm_dir, write_glove_text

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("aug_job_assets")
    return {"mlm": str(tiny_mlm_dir(d / "mlm")), "glove": str(write_glove_text(d / "glove.test.txt"))}


def write_sst(path: Path, sentences, extra_lines=()) -> Path:
    lines = ["sentence\tlabel"] + [f"{s}\t{i % 2}" for i, s in enumerate(sentences)] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def config(assets, inp, out, **kw) -> AugmentConfig:
    job = dict(chunk_size=3, progress=False)
    job.update(kw.pop("job", {}))
    return AugmentConfig(
        task=kw.pop("task", "sst2"), input=str(inp), output=str(out), num_candidates=4, num_new=kw.pop("num_new", 6),
        seed=kw.pop("seed", 1), glove=GloveConfig(path=assets["glove"]), mlm=MLMConfig(model=assets["mlm"], device="cpu"),
        job=JobConfig(**job), **kw,
    )


def test_counts_order_and_manifest(assets, tmp_path):
    inp = write_sst(tmp_path / "train.tsv", SST_ROWS)
    out = tmp_path / "train_aug.tsv"
    res = run_shard(config(assets, inp, out))
    assert res.merged == out and res.chunks_run == 3
    spec = get_task("sst2")
    examples, _ = read_task_file(out, spec)
    # each input row comes first, in input order, followed by at most N new rows with its label
    originals = [i for i, e in enumerate(examples) if e.text_a in SST_ROWS]
    assert [examples[i].text_a for i in originals] == SST_ROWS
    bounds = originals + [len(examples)]
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        group = examples[a:b]
        assert 1 <= len(group) <= 1 + 6 and {e.label for e in group} == {str(k % 2)}
        assert len({e.text_a for e in group}) == len(group)
    m = json.loads(manifest_path(out).read_text())
    assert m["counts"]["examples"] == 7 and m["counts"]["output_rows"] == len(examples)
    assert m["counts"]["new_rows"] == len(examples) - 7 and m["counts"]["new_rows"] > 10
    assert m["per_shard"] == {"0": {"chunks": 3, "examples": 7, "rows": len(examples)}}
    from ds_kdqat.fileio import sha256_file

    assert m["parameters"]["input_sha256"] == sha256_file(inp) and m["output_sha256"] == sha256_file(out)
    assert m["parameters"]["num_new"] == 6 and m["seed"] == 1
    # a second run finds everything done and rewrites the same bytes
    before = out.read_bytes()
    assert run_shard(config(assets, inp, out)).chunks_run == 0
    assert out.read_bytes() == before


def test_pairs_augment_each_side(assets, tmp_path):
    inp = tmp_path / "train.tsv"
    rows = [("0", SST_ROWS[0], SST_ROWS[1], "entailment"), ("1", SST_ROWS[2], SST_ROWS[3], "not_entailment")]
    inp.write_text("index\tsentence1\tsentence2\tlabel\n" + "".join("\t".join(r) + "\n" for r in rows))
    out = tmp_path / "aug.tsv"
    run_shard(config(assets, inp, out, task="rte"))
    lines = [ln.split("\t") for ln in out.read_text().splitlines()[1:]]
    for idx, a, b, label in rows:
        group = [ln for ln in lines if ln[0] == idx]
        assert group[0] == [idx, a, b, label]
        new_a = [g for g in group[1:] if g[2] == b]
        new_b = [g for g in group[1:] if g[1] == a]
        assert new_a and new_b and len(new_a) + len(new_b) == len(group) - 1  # exactly one side changed
        assert all(g[1] != a and g[3] == label for g in new_a) and all(g[2] != b for g in new_b)
        i_last_a = max(group.index(g) for g in new_a)
        assert all(group.index(g) > i_last_a for g in new_b)  # side a's rows, then side b's


def test_determinism_shards_and_seed(assets, tmp_path):
    inp = write_sst(tmp_path / "train.tsv", SST_ROWS)
    single = tmp_path / "single.tsv"
    run_shard(config(assets, inp, single))
    sharded = tmp_path / "sharded.tsv"
    r0 = run_shard(config(assets, inp, sharded, job={"shard_index": 0, "num_shards": 2}))
    assert r0.merged is None and not sharded.exists() and r0.chunks_run == 2  # chunks 0 and 2
    r1 = run_shard(config(assets, inp, sharded, job={"shard_index": 1, "num_shards": 2}))
    assert r1.merged == sharded and r1.chunks_run == 1
    assert sharded.read_bytes() == single.read_bytes()
    m = json.loads(manifest_path(sharded).read_text())
    assert (m["per_shard"]["0"]["chunks"], m["per_shard"]["0"]["examples"]) == (2, 4)  # lines 2-4 and 8
    assert (m["per_shard"]["1"]["chunks"], m["per_shard"]["1"]["examples"]) == (1, 3)  # lines 5-7
    assert m["per_shard"]["0"]["rows"] + m["per_shard"]["1"]["rows"] == m["counts"]["output_rows"]
    # the chunk size changes batching but not the random streams (keyed by line): same output
    rechunked = tmp_path / "rechunked.tsv"
    run_shard(config(assets, inp, rechunked, job={"chunk_size": 7}))
    assert rechunked.read_bytes() == single.read_bytes()
    other = tmp_path / "other.tsv"
    run_shard(config(assets, inp, other, seed=2))
    assert other.read_bytes() != single.read_bytes()


def test_restart_with_other_parameters_is_refused(assets, tmp_path):
    inp = write_sst(tmp_path / "train.tsv", SST_ROWS)
    out = tmp_path / "aug.tsv"
    run_shard(config(assets, inp, out, job={"merge": False}))
    cfg = config(assets, inp, out)
    cfg.replace_prob = 0.3
    with pytest.raises(ConfigError, match=r"augment.job.parts_dir.*different job.*replace_prob"):
        run_shard(cfg)


def test_a_file_or_folder_the_job_did_not_write_is_refused_untouched(assets, tmp_path):
    inp = write_sst(tmp_path / "train.tsv", SST_ROWS)
    out = tmp_path / "aug.tsv"
    out.write_text("my own file\n")
    with pytest.raises(ConfigError, match=r"augment.output: .*aug.tsv exists and was not written by this"):
        run_shard(config(assets, inp, out))
    assert out.read_text() == "my own file\n" and not (tmp_path / "aug.tsv.parts").exists()
    parts = tmp_path / "mine"
    parts.mkdir()
    (parts / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match=r"augment.job.parts_dir: .*mine is not empty"):
        run_shard(config(assets, inp, tmp_path / "aug2.tsv", job={"parts_dir": str(parts)}))
    assert [p.name for p in parts.iterdir()] == ["notes.txt"] and not (tmp_path / "aug2.tsv").exists()
    # the job's own output, from a finished run, is rewritten by a rerun of the same job
    run_shard(config(assets, inp, tmp_path / "aug3.tsv"))
    first = (tmp_path / "aug3.tsv").read_bytes()
    run_shard(config(assets, inp, tmp_path / "aug3.tsv"))
    assert (tmp_path / "aug3.tsv").read_bytes() == first


def test_bad_rows(assets, tmp_path):
    inp = write_sst(tmp_path / "train.tsv", SST_ROWS[:3], ["only one column", "a good film\t7"])
    with pytest.raises(DataError, match=r"train.tsv:5: expected 2 tab-separated columns"):
        run_shard(config(assets, inp, tmp_path / "aug.tsv"))
    out = tmp_path / "aug_skip.tsv"
    run_shard(config(assets, inp, out, job={"on_bad_row": "skip"}))
    m = json.loads(manifest_path(out).read_text())
    assert m["counts"]["bad_rows_skipped"] == 2 and m["counts"]["examples"] == 3 and m["counts"]["input_rows"] == 5
    assert m["bad_rows"][0].endswith("train.tsv:5: expected 2 tab-separated columns, found 1")
    assert "train.tsv:6: unknown label '7'" in m["bad_rows"][1]


def test_shard_from_env():
    assert shard_from_env({"RANK": "3", "WORLD_SIZE": "8"}) == (3, 8)
    assert shard_from_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "4"}) == (1, 4)
    assert shard_from_env({}) == (0, 1)


def test_resume_after_kill_with_workers(assets, tmp_path):
    """SIGKILL a running job, damage its last part, restart with 2 workers: same file as an uninterrupted run."""
    sentences = [SST_ROWS[i % len(SST_ROWS)] + f" {'very ' * (i % 4)}good" for i in range(160)]
    inp = write_sst(tmp_path / "train.tsv", sentences)
    ref = tmp_path / "ref.tsv"
    run_shard(config(assets, inp, ref, job={"chunk_size": 2}))
    out = tmp_path / "aug.tsv"
    args = [
        sys.executable, str(REPO / "run/augment.py"), "--task", "sst2", "--input", str(inp), "--output", str(out),
        "--M", "4", "--N", "6", "--seed", "1", "--glove", assets["glove"], "--mlm_model", assets["mlm"],
        "--device", "cpu", "--chunk_size", "2", "--no_progress",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    parts = Path(str(out) + ".parts")
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("chunk-*.json"))) < 5:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(parts.glob("chunk-*.json"))
    assert 5 <= len(done) < 80, "the job should have been killed mid-run"
    assert not out.exists()
    # a crash between writing a part and its marker: the part is there, the marker is not -> redone
    done[-1].unlink()
    res = subprocess.run(args + ["--num_workers", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"{80 - len(done) + 1} chunks run, {len(done) - 1} already done" in res.stdout
    assert out.read_bytes() == ref.read_bytes()


def test_headerless_layout_cola(assets, tmp_path):
    """CoLA files have no header: every chunk's first line is data and must survive the merge."""
    inp = tmp_path / "train.tsv"
    inp.write_text("".join(f"src{i}\t{i % 2}\t\t{s}\n" for i, s in enumerate(SST_ROWS)))
    out = tmp_path / "aug.tsv"
    run_shard(config(assets, inp, out, task="cola", job={"chunk_size": 2}))
    lines = [ln.split("\t") for ln in out.read_text().splitlines()]
    m = json.loads(manifest_path(out).read_text())
    assert len(lines) == m["counts"]["output_rows"] and m["counts"]["chunks"] == 4
    assert [ln for ln in lines if ln[3] in SST_ROWS] == [[f"src{i}", str(i % 2), "", s] for i, s in enumerate(SST_ROWS)]
    # every new row keeps its original's source and label columns
    assert all(ln[1] == str(int(ln[0][3:]) % 2) and ln[2] == "" for ln in lines)
    assert len(lines) > len(SST_ROWS) + 10
