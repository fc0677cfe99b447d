"""Augmentation throughput changes: grouped chunks (same bytes as chunk by chunk and as the reference, resume
after a crash mid-group), the GloVe tie check, the row-wise int8 masked LM (config, identity, batch
invariance), and worker errors reported instead of hanging the pool."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import augment.job as job_module
from augment.build import augment_params, build_augmenter
from augment.config import AugmentConfig, GloveConfig, JobConfig, MLMConfig
from augment.glove import GloveNeighbours, GloveVectors, load_glove
from augment.int8 import RowwiseInt8Linear, check_int8_dynamic, quantize_linears
from augment.job import job_identity, manifest_path, plan_groups, run_shard
from augment.mlm import load_masked_lm
from augment.reference import ReferenceAugmenter
from augment.stopwords import load_stopwords
from augment.words import WordSplitter
from ds_kdqat.errors import ConfigError
from test_augment_common import SST_ROWS, tiny_mlm_dir, write_glove_text

REPO = Path(__file__).resolve().parents[1]
# 14 sentences of varied lengths: 7 chunks of 2
SENTENCES = SST_ROWS + [f"{s} {'very ' * (i % 3)}good" for i, s in enumerate(SST_ROWS)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("aug_throughput_assets")
    return {"mlm": str(tiny_mlm_dir(d / "mlm")), "glove": str(write_glove_text(d / "glove.test.txt"))}


def write_sst(path: Path, sentences) -> Path:
    path.write_text("sentence\tlabel\n" + "".join(f"{s}\t{i % 2}\n" for i, s in enumerate(sentences)), encoding="utf-8")
    return path


def config(assets, inp, out, precision="fp32", source="mlm_glove", **job) -> AugmentConfig:
    return AugmentConfig(
        task="sst2", input=str(inp), output=str(out), num_candidates=4, num_new=6, seed=1, candidate_source=source,
        glove=GloveConfig(path=assets["glove"]), mlm=MLMConfig(model=assets["mlm"], device="cpu", batch_size=5, precision=precision),
        job=JobConfig(**{"chunk_size": 2, "progress": False, **job}),
    )


def reference_texts(assets, cfg: AugmentConfig, sentences) -> list[str]:
    """The merged file's sentence column as the one-at-a-time reference makes it (fp32)."""
    lm = load_masked_lm(assets["mlm"], device="cpu")
    ref = ReferenceAugmenter(WordSplitter(lm.tokenizer), load_stopwords(), augment_params(cfg), load_glove(assets["glove"]), lm)
    # data lines start at 2 (line 1 is the header)
    return [t for i, s in enumerate(sentences) for t in [s, *ref.augment_one([s], cfg.seed, i + 2)[0]]]


def sentence_column(path: Path) -> list[str]:
    return [line.split("\t")[0] for line in path.read_text(encoding="utf-8").splitlines()[1:]]


# ------------------------------------------------------------------------------------------ grouped chunks


def test_plan_groups_guided_sizes():
    groups = plan_groups(list(range(32)), 64, None, 2)  # cap 256 // 64 = 4
    assert [len(g) for g in groups] == [4, 4, 4, 4, 4, 3, 3, 2, 1, 1, 1, 1]
    assert [k for g in groups for k in g] == list(range(32))
    assert [len(g) for g in plan_groups([3, 5, 9], 64, None, 1)] == [2, 1]  # pending chunks of a resumed shard
    assert [len(g) for g in plan_groups(list(range(10)), 2, 3, 1)] == [3, 3, 2, 1, 1]
    assert plan_groups(list(range(4)), 300, None, 8) == [[0], [1], [2], [3]]
    assert plan_groups([], 64, None, 2) == []


@pytest.mark.parametrize("source", ["mlm_glove", "mlm"])
def test_grouped_chunks_equal_chunk_by_chunk_and_the_reference(assets, tmp_path, source):
    inp = write_sst(tmp_path / "train.tsv", SENTENCES)
    outs = {}
    for name, group in (("per_chunk", 1), ("groups_of_3", 3), ("auto", None)):
        outs[name] = tmp_path / f"{name}.tsv"
        res = run_shard(config(assets, inp, outs[name], source=source, chunks_per_group=group))
        assert res.chunks_run == 7 and res.merged == outs[name]
    first = outs["per_chunk"].read_bytes()
    assert outs["groups_of_3"].read_bytes() == first and outs["auto"].read_bytes() == first
    cfg = config(assets, inp, outs["per_chunk"], source=source)
    assert sentence_column(outs["per_chunk"]) == reference_texts(assets, cfg, SENTENCES)
    assert len(sentence_column(outs["per_chunk"])) > 2 * len(SENTENCES)  # not a vacuous comparison


class Crash(Exception):
    pass


def test_crash_mid_group_resumes_to_the_same_bytes(assets, tmp_path, monkeypatch):
    inp = write_sst(tmp_path / "train.tsv", SENTENCES)
    want = tmp_path / "want.tsv"
    run_shard(config(assets, inp, want, chunks_per_group=1))
    out = tmp_path / "aug.tsv"
    commit = job_module.commit_chunk
    committed: list[int] = []

    def crash_at_chunk_1(info, k, examples, new):
        if k == 1:  # the first group is chunks 0, 1, 2: chunk 0 is committed, 1 and 2 are not
            raise Crash()
        committed.append(k)
        return commit(info, k, examples, new)

    monkeypatch.setattr(job_module, "commit_chunk", crash_at_chunk_1)
    with pytest.raises(Crash):
        run_shard(config(assets, inp, out, chunks_per_group=3))
    parts = Path(str(out) + ".parts")
    assert committed == [0] and [p.name for p in sorted(parts.glob("chunk-*.json"))] == ["chunk-000000.json"]
    assert not out.exists()
    monkeypatch.setattr(job_module, "commit_chunk", commit)
    res = run_shard(config(assets, inp, out, chunks_per_group=3))  # groups [1, 2, 3], [4, 5], [6]: others than before
    assert res.chunks_run == 6 and out.read_bytes() == want.read_bytes()


def test_glove_ties_at_the_cut_take_lower_indices():
    # cosines to "q": a = b = c = 1/√2 (three-way tie at places 2-4), d = 1 (first), e = 0
    vectors = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    words = ["q", "a", "e", "b", "c", "d", "f"]
    nb = GloveNeighbours(GloveVectors(words, vectors.numpy()), num_candidates=3)
    assert nb.neighbours("q") == ["d", "a", "b"]  # the tie at places 2-4 cut by index: a (1), b (3), not c (4)
    every = GloveNeighbours(GloveVectors(words, vectors.numpy()), num_candidates=6).neighbours("q")
    assert every[0] == "d" and set(every[1:4]) == {"a", "b", "c"} and every[4:] == ["e", "f"]  # no cut inside a tie
    assert GloveNeighbours(GloveVectors(["x"], vectors[:1].numpy()), num_candidates=3).neighbours("x") == []


# --------------------------------------------------------------------------------------------- int8 masked LM


def test_rowwise_int8_linear_is_close_and_batch_invariant():
    torch.manual_seed(0)
    linear = nn.Linear(48, 24)
    q = RowwiseInt8Linear(linear)
    x = torch.randn(5, 7, 48) * torch.linspace(0.1, 10, 7)[None, :, None]  # rows of very different ranges
    with torch.inference_mode():
        y, want = q(x), linear(x)
        assert y.shape == want.shape
        assert ((y - want).norm() / want.norm()).item() < 0.03
        for row in range(7):  # each row alone gives the same bits as inside the batch
            assert torch.equal(q(x[2, row : row + 1]), y[2, row : row + 1])
        assert torch.equal(q(torch.zeros(1, 48)), linear.bias.detach()[None])
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4)))
    assert quantize_linears(model) == 2 and isinstance(model[2][0], RowwiseInt8Linear)


@pytest.mark.parametrize(
    "cfg, path",
    [
        (AugmentConfig(mlm=MLMConfig(precision="int8")), "augment.mlm.precision"),
        (AugmentConfig(mlm=MLMConfig(precision="int8_dynamic", device="cuda")), "augment.mlm.precision"),
        (AugmentConfig(candidate_source="glove", mlm=MLMConfig(precision="int8_dynamic")), "augment.mlm.precision"),
        (AugmentConfig(job=JobConfig(chunks_per_group=0)), "augment.job.chunks_per_group"),
        (AugmentConfig(job=JobConfig(chunks_per_group=True)), "augment.job.chunks_per_group"),
    ],
)
def test_precision_and_group_config_errors_name_the_key(cfg, path):
    with pytest.raises(ConfigError) as e:
        cfg.validate("augment")
    assert e.value.path == path


def test_default_batch_size_is_per_device():
    from augment.augmenter import default_batch_size

    AugmentConfig(mlm=MLMConfig(batch_size=None)).validate()
    assert default_batch_size(torch.device("cpu")) == 32 and default_batch_size(torch.device("cuda")) == 64


def test_int8_refused_off_the_cpu():
    AugmentConfig(mlm=MLMConfig(precision="int8_dynamic", device="cpu")).validate()
    with pytest.raises(ConfigError, match=r"augment.mlm.precision: .*CPU int8 kernels.*on cuda"):
        check_int8_dynamic(torch.device("cuda"))


def test_int8_is_part_of_the_job_identity(assets, tmp_path):
    cfg = config(assets, "x", "y")
    fp32, int8 = job_identity(cfg, "sha"), job_identity(config(assets, "x", "y", precision="int8_dynamic"), "sha")
    assert fp32["mlm"]["precision"] == "fp32" and int8["mlm"]["precision"] == "int8_dynamic"
    assert {k for k in fp32 if fp32[k] != int8[k]} == {"mlm"}
    inp = write_sst(tmp_path / "train.tsv", SENTENCES[:4])
    out = tmp_path / "aug.tsv"
    run_shard(config(assets, inp, out, merge=False))
    with pytest.raises(ConfigError, match=r"augment.job.parts_dir: .*different job \(differs in: mlm\)"):
        run_shard(config(assets, inp, out, precision="int8_dynamic"))
    # a job.json written before mlm.precision existed is an fp32 job
    job_file = Path(str(out) + ".parts") / "job.json"
    recorded = json.loads(job_file.read_text())
    del recorded["mlm"]["precision"]
    job_file.write_text(json.dumps(recorded))
    assert run_shard(config(assets, inp, out)).chunks_run == 0


def test_int8_job_runs_is_independent_of_groups_and_recorded(assets, tmp_path):
    inp = write_sst(tmp_path / "train.tsv", SENTENCES)
    aug = build_augmenter(config(assets, inp, tmp_path / "x.tsv", precision="int8_dynamic"))
    assert aug.masked_lm.description["precision"] == "int8_dynamic"
    assert sum(isinstance(m, RowwiseInt8Linear) for m in aug.masked_lm.encoder.modules()) == 12  # 2 layers × 6
    [table] = aug.candidate_tables(["a very funny film , really good music"])
    assert table.candidates and all(len(c) == 4 for c in table.candidates.values())
    outs = []
    for name, group in (("per_chunk", 1), ("auto", None)):
        out = tmp_path / f"int8_{name}.tsv"
        run_shard(config(assets, inp, out, precision="int8_dynamic", chunks_per_group=group))
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    manifest = json.loads(manifest_path(tmp_path / "int8_auto.tsv").read_text())
    assert manifest["parameters"]["mlm"]["precision"] == "int8_dynamic"


# ------------------------------------------------------------------------------------------------ workers


def test_worker_start_up_error_is_reported_not_hung(assets, tmp_path):
    inp = write_sst(tmp_path / "train.tsv", SENTENCES[:4])
    args = [
        sys.executable, str(REPO / "run/augment.py"), "--task", "sst2", "--input", str(inp), "--output",
        str(tmp_path / "aug.tsv"), "--N", "2", "--glove", assets["glove"], "--mlm_model", assets["mlm"],
        "--mlm_head", str(tmp_path / "missing.safetensors"), "--device", "cpu", "--chunk_size", "1",
        "--num_workers", "2", "--no_progress",
    ]
    res = subprocess.run(args, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 2, res.stderr[-2000:]
    assert "augment.mlm.head" in res.stderr and "missing.safetensors does not exist" in res.stderr


def test_int8_encoder_output_of_a_query_does_not_depend_on_its_batch(assets):
    """Same-length queries (no padding): a query's encoder output alone and inside a batch are the same bits in
    int8, as in fp32 (per-row activation scales; one scale per batch, as quantize_dynamic takes, moves it by
    ~1e-4 here)."""
    from augment.int8 import quantize_encoder
    from augment.mlm import build_query

    lm = load_masked_lm(assets["mlm"], device="cpu")
    quantize_encoder(lm)
    pieces = WordSplitter(lm.tokenizer).split("a very funny film , really good music and a great cast").pieces
    flat = [i for ps in pieces for i in ps]
    queries = [build_query(flat, q, "pair", 64, lm.cls_id, lm.sep_id, lm.mask_id) for q in range(len(flat))]

    def hidden(batch):
        ids = torch.tensor([q.input_ids for q in batch])
        with torch.inference_mode():
            return lm.encoder(input_ids=ids, token_type_ids=torch.tensor([q.token_type_ids for q in batch])).last_hidden_state

    together = hidden(queries)
    for i in (0, 3, len(queries) - 1):
        assert torch.equal(hidden([queries[i]])[0], together[i])
