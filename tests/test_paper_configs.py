"""ds_configs/paper/: every config loads, validates and resolves, and says what the papers say (the table
below); kdqat.data.primary_metric; sweeps/paper_glue.yaml and its per-task trainer.

Sources of the numbers (papers in the shared folder, and their released code where the text is silent):

* TernaryBERT (Zhang et al. 2020, §4.1): lr 2e-5 decaying linearly to 0, batch 16 for CoLA and 32 otherwise,
  sequence length 64 for CoLA/SST-2 and 128 otherwise, 1 epoch on the augmented train set, 3 epochs on the
  original one for STS-B, MNLI, QQP (augmentation does not help them); warm-up 0.1 and dev evaluation every
  ``eval_step`` steps from its quant_task_glue.py; STS-B reported by Spearman.
* Attention-map / attention-output losses (Kim et al. 2022, A.4 and Table 6): batch 16 for CoLA and 32
  otherwise, lr 2e-5 with warm-up and linear decay, 3 epochs, BertAdam, no augmentation; "Map+Output" of
  Table 2 is SM1 = map + γ·output with the task's best γ of Table 6 (BERT-Base column).
* Teacher Intervention (Table 2 and §5.1): budgets O / O2 / O4 = 3 / 6 / 12 epochs, no augmentation; TI-G
  (TI-O then TI-M) for up to one epoch, then KD-QAT with the TernaryBERT losses; the TernaryBERT settings
  otherwise (its code base).
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from ds_kdqat.config import load_config, parse_config
from ds_kdqat.data import DataConfig, task_spec
from ds_kdqat.data.tasks import get_task
from ds_kdqat.distill.config import budget_multiplier
from ds_kdqat.distill.schedule import plan_training
from ds_kdqat.errors import ConfigError
from ds_kdqat.training.order import micro_batches_per_epoch

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "ds_configs" / "paper"
SWEEP_FILE = ROOT / "sweeps" / "paper_glue.yaml"

GLUE = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")
GLUE_DIRS = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qqp": "QQP", "mnli": "MNLI",
             "qnli": "QNLI", "rte": "RTE"}
# GLUE train sizes (the distributed train.tsv files), to turn epochs into steps
TRAIN_SIZE = {"cola": 8551, "sst2": 67349, "mrpc": 3668, "stsb": 5749, "qqp": 363846, "mnli": 392702,
              "qnli": 104743, "rte": 2490}
LR = 2e-5
SEQ = {t: 64 if t in ("cola", "sst2") else 128 for t in GLUE}
BATCH = {t: 16 if t == "cola" else 32 for t in GLUE}
TB_AUGMENTED = {"cola", "sst2", "mrpc", "qnli", "rte"}  # TernaryBERT: not STS-B, MNLI, QQP
SM1_GAMMA = {"rte": 0.6, "cola": 0.4, "stsb": 0.7, "mrpc": 0.1, "sst2": 0.2, "qnli": 0.8, "mnli": 0.5, "qqp": 0.1}
TI_TASKS = ("rte", "cola", "stsb", "mrpc")  # Teacher Intervention, Table 3
BUDGET_EPOCHS = {"O": 3, "O2": 6, "O4": 12}

# name -> task, learning rate, batch, sequence length, epochs (budget included), recipe, augmented, extra
ROWS: dict[str, dict] = {}
for _t in GLUE:
    ROWS[f"teacher_{_t}"] = dict(task=_t, lr=LR, batch=32, seq=SEQ[_t], epochs=3, recipe="ternarybert",
                                 augmented=False, role="teacher")
    ROWS[f"ternarybert_{_t}"] = dict(task=_t, lr=LR, batch=BATCH[_t], seq=SEQ[_t],
                                     epochs=1 if _t in TB_AUGMENTED else 3, recipe="ternarybert",
                                     augmented=_t in TB_AUGMENTED, budget="O")
    ROWS[f"attention_loss_{_t}"] = dict(task=_t, lr=LR, batch=BATCH[_t], seq=SEQ[_t], epochs=3,
                                        recipe="map_output", augmented=False, budget="O", unified="SM1",
                                        gamma=SM1_GAMMA[_t])
for _t in TI_TASKS:
    for _b, _epochs in BUDGET_EPOCHS.items():
        ROWS[f"ti_{_b.lower()}_{_t}"] = dict(task=_t, lr=LR, batch=BATCH[_t], seq=SEQ[_t], epochs=_epochs,
                                             recipe="ti_gradual", augmented=False, budget=_b)


def _load(name: str):
    return load_config(str(PAPER / f"{name}.json"))


def test_every_paper_config_is_in_the_table():
    shipped = sorted(p.stem for p in PAPER.glob("*.json"))
    assert shipped == sorted(ROWS), "a config without a row in ROWS (or a row without its config)"


@pytest.mark.parametrize("name", sorted(ROWS))
def test_paper_config_loads_validates_and_matches_the_paper(name):
    row = ROWS[name]
    run = _load(name)  # validates every section, DeepSpeed's keys included
    cfg = run.kdqat
    spec = task_spec(cfg.data)
    assert spec.name == row["task"]
    assert cfg.train.learning_rate == row["lr"]
    assert run.micro_batch_size == row["batch"] and run.gradient_accumulation_steps == 1
    assert run.deepspeed["gradient_clipping"] == 1.0
    assert cfg.data.max_seq_length == row["seq"]
    assert cfg.train.epochs * budget_multiplier(cfg.distill.budget) == row["epochs"]
    assert (cfg.train.optimizer, cfg.train.weight_decay, cfg.train.warmup_proportion) == ("bertadam", 0.01, 0.1)
    assert cfg.distill.recipe == row["recipe"]
    assert cfg.quant.preset == "ternarybert"  # W2-E2-A8: TWN layer-wise, word embedding row-wise, 8-bit min-max
    assert cfg.data.source == "hub"
    # the teacher: BERT-base fine-tuned on the task (by teacher_<task>.json), the same for every setting
    assert (cfg.finetune.learning_rate, cfg.finetune.epochs) == (LR, 3)
    if row.get("role") == "teacher":
        assert (cfg.model.teacher, cfg.model.local_files_only) == ("bert-base-uncased", False)
        assert cfg.output_dir == os.path.normpath(f"outputs/paper/{name}")
    else:
        assert cfg.model.teacher == f"outputs/paper/teacher_{row['task']}/teacher"
        assert cfg.output_dir == os.path.normpath(f"outputs/paper/{name}")
    if row["augmented"]:
        assert cfg.data.train_file == f"data/glue/{GLUE_DIRS[row['task']]}/train_aug.tsv"
    else:
        assert cfg.data.train_file is None
    assert spec.primary_metric == ("spearman" if row["task"] == "stsb" else get_task(row["task"]).primary_metric)
    if "gamma" in row:
        assert (cfg.distill.unified, cfg.distill.gamma) == (row["unified"], row["gamma"])
    if "budget" in row:
        assert cfg.distill.budget == row["budget"]
    # what the model will see: positions within BERT-base's 512
    assert cfg.data.max_seq_length <= 512


@pytest.mark.parametrize("name", sorted(n for n in ROWS if n.startswith("ti_")))
def test_teacher_intervention_step_is_one_epoch_at_every_budget(name):
    """§5.1: the TI step runs up to one epoch, then KD-QAT; O2/O4 add KD-QAT steps, not TI steps."""
    run = _load(name)
    cfg = run.kdqat
    per_epoch = micro_batches_per_epoch(TRAIN_SIZE[cfg.data.task], run.micro_batch_size, 1)
    base_steps = math.ceil(cfg.train.epochs * per_epoch)
    plan = plan_training(cfg.distill, base_steps)
    ti = [span for span in plan.phases if span.phase in ("ti_output", "ti_map")]
    kd = [span for span in plan.phases if span.phase == "kd"]
    assert [s.phase for s in ti] == ["ti_output", "ti_map"]  # TI-G: output intervention, then map
    assert abs(sum(s.steps for s in ti) - per_epoch) <= 1
    assert plan.total_steps == BUDGET_EPOCHS[cfg.distill.budget] * per_epoch
    assert kd[0].end == plan.total_steps and cfg.distill.ti.kd_recipe == "ternarybert"


@pytest.mark.parametrize("name", sorted(n for n in ROWS if not n.startswith("teacher_")))
def test_every_setting_has_its_teacher_config(name):
    run = _load(name)
    teacher = _load(f"teacher_{run.kdqat.data.task}")
    assert run.kdqat.model.teacher == os.path.join(teacher.kdqat.output_dir, "teacher")
    assert teacher.kdqat.data.max_seq_length == run.kdqat.data.max_seq_length
    assert teacher.kdqat.data.train_file is None  # fine-tuned on the original train set, never the augmented one


def test_paper_readme_lists_every_config():
    readme = (PAPER / "README.md").read_text(encoding="utf-8")
    for name in ROWS:
        assert f"`{name}.json`" in readme, name


# the other rows of the papers' tables, as ds_configs/paper/README.md tells to run them
OTHER_ROWS = [
    ("attention_loss_rte", ["kdqat.distill.recipe=ternarybert"], "ternarybert", 3),
    ("attention_loss_rte", ["kdqat.distill.recipe=map"], "map", 3),
    ("attention_loss_rte", ["kdqat.distill.recipe=output"], "output", 3),
    ("attention_loss_rte", ["kdqat.distill.unified=SM2", "kdqat.distill.gamma=0.4"], "map_output", 3),
    ("attention_loss_cola", ["kdqat.distill.recipe=ternarybert", "kdqat.distill.budget=O2"], "ternarybert", 6),
    ("attention_loss_cola", ["kdqat.distill.recipe=ternarybert", "kdqat.distill.budget=O4"], "ternarybert", 12),
    ("ti_o_stsb", ["kdqat.distill.recipe=ti_map"], "ti_map", 3),
    ("ti_o_stsb", ["kdqat.distill.recipe=ti_output"], "ti_output", 3),
    ("ternarybert_mrpc", ["kdqat.quant.preset=ternarybert_lat"], "ternarybert", 1),
    ("ternarybert_mrpc", ["kdqat.data.train_file=null", "kdqat.train.epochs=3"], "ternarybert", 3),
]


@pytest.mark.parametrize("name,overrides,recipe,epochs", OTHER_ROWS)
def test_other_rows_of_the_papers_tables_validate(name, overrides, recipe, epochs):
    run = load_config(str(PAPER / f"{name}.json"), overrides)
    assert run.kdqat.distill.recipe == recipe
    assert run.kdqat.train.epochs * budget_multiplier(run.kdqat.distill.budget) == epochs


# ------------------------------------------------------------------------------------ primary_metric


def _data_section(**data) -> dict:
    return {"train_micro_batch_size_per_gpu": 8, "kdqat": {"data": data}}


def test_primary_metric_option_changes_the_spec():
    assert task_spec(DataConfig(task="stsb", source="hub")).primary_metric == "pearson"
    spec = task_spec(parse_config(_data_section(task="stsb", source="hub", primary_metric="spearman")).kdqat.data)
    assert spec.primary_metric == "spearman" and spec.metrics == ("pearson", "spearman")
    mrpc = task_spec(parse_config(_data_section(task="mrpc", source="hub", primary_metric="accuracy")).kdqat.data)
    assert (mrpc.primary_metric, mrpc.labels) == ("accuracy", get_task("mrpc").labels)
    # the default named explicitly is the registered spec itself
    assert task_spec(DataConfig(task="cola", source="hub", primary_metric="mcc")) is get_task("cola")


@pytest.mark.parametrize("task,value", [("stsb", "accuracy"), ("stsb", "Spearman"), ("cola", "accuracy"),
                                        ("rte", "f1"), ("sst2", "")])
def test_primary_metric_outside_the_tasks_metrics_is_a_config_error(task, value):
    with pytest.raises(ConfigError) as caught:
        parse_config(_data_section(task=task, source="hub", primary_metric=value))
    assert caught.value.path == "kdqat.data.primary_metric"
    for allowed in get_task(task).metrics:
        assert f'"{allowed}"' in caught.value.message


def test_primary_metric_must_be_a_string():
    with pytest.raises(ConfigError) as caught:
        parse_config(_data_section(task="stsb", source="hub", primary_metric=1))
    assert caught.value.path == "kdqat.data.primary_metric"


def test_primary_metric_override_from_the_command_line():
    run = load_config(str(PAPER / "ternarybert_stsb.json"), ["kdqat.data.primary_metric=pearson"])
    assert task_spec(run.kdqat.data).primary_metric == "pearson"
    with pytest.raises(ConfigError, match="kdqat.data.primary_metric"):
        load_config(str(PAPER / "ternarybert_stsb.json"), ["kdqat.data.primary_metric=mcc"])


def test_described_task_primary_metric_unchanged(tmp_path):
    for split in ("train", "dev"):
        (tmp_path / f"{split}.csv").write_text("text,label\na,1\nb,2\n", encoding="utf-8")
    data = dict(task="custom", train_file=str(tmp_path / "train.csv"), dev_file=str(tmp_path / "dev.csv"),
                task_type="regression", primary_metric="spearman")
    assert task_spec(parse_config(_data_section(**data)).kdqat.data).primary_metric == "spearman"
    with pytest.raises(ConfigError, match="kdqat.data.primary_metric"):
        parse_config(_data_section(**{**data, "primary_metric": "accuracy"}))


# ------------------------------------------------------------------------------------------- the sweep


def _sweep(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ds_kdqat", "sweep", "--config", str(SWEEP_FILE),
                           "--set", f"output_root={tmp_path / 'runs'}", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_paper_sweep_lists_and_dry_runs(tmp_path):
    listed = _sweep("--list", tmp_path=tmp_path)
    assert listed.returncode == 0, listed.stderr
    lines = [line for line in listed.stdout.splitlines() if "pending" in line]
    assert len(lines) == len(GLUE) * 5
    for task in GLUE:
        assert sum(f"ternarybert_{task}_O_s" in line for line in lines) == 5
    dry = _sweep("--dry-run", tmp_path=tmp_path)
    assert dry.returncode == 0, dry.stderr
    commands = [line for line in dry.stdout.splitlines() if "--ds_config" in line]
    assert len(commands) == len(GLUE) * 5
    for task in GLUE:  # each point starts from its own task's paper config
        assert sum(f"ds_configs/paper/ternarybert_{task}.json" in c for c in commands) == 5
    assert not (tmp_path / "runs").exists()  # --list and --dry-run write nothing


def test_each_sweep_point_runs_its_tasks_paper_config(tmp_path, monkeypatch):
    """The trainer command of every point, as the sweep writes it, loads the task's paper config with the
    point's seed and output folder."""
    from ds_kdqat.cli import config_parser
    from ds_kdqat.commands.run_config import load_run_config
    from ds_kdqat.sweep import grid_points, load_sweep_config, point_command

    monkeypatch.chdir(ROOT)
    config = load_sweep_config(SWEEP_FILE, [f"output_root={tmp_path / 'runs'}"])
    for point in grid_points(config):
        command = point_command(config, point)
        argv = command[command.index(config.trainer) + 1:]
        assert argv[argv.index("--ds_config") + 1] == str(PAPER / f"ternarybert_{point.task}.json")
        run = load_run_config(config_parser("train").parse_args(argv))
        expected = _load(f"ternarybert_{point.task}")
        assert run.kdqat.seed == point.seed
        assert run.kdqat.output_dir == os.path.normpath(str(tmp_path / "runs" / point.name))
        assert run.kdqat.logging.progress is False
        for key in ("data", "train", "distill", "model", "quant"):
            assert getattr(run.kdqat, key) == getattr(expected.kdqat, key), (point.name, key)
        assert run.deepspeed["train_micro_batch_size_per_gpu"] == expected.micro_batch_size


def test_sweep_ds_config_placeholders(tmp_path, monkeypatch):
    """{task}, {recipe}, {budget} (lower case) name each point's file; an unknown placeholder or a point without
    its file is a ConfigError naming ds_config."""
    from ds_kdqat.errors import ConfigError
    from ds_kdqat.sweep import grid_points, load_sweep_config, point_command

    monkeypatch.chdir(ROOT)
    overrides = [f"output_root={tmp_path}", "ds_config=ds_configs/paper/ti_{budget}_{task}.json",
                 'axes.tasks=["rte","mrpc"]', 'axes.budgets=["O","O2","O4"]', 'axes.recipes=["ti_gradual"]']
    config = load_sweep_config(SWEEP_FILE, overrides)
    files = {Path(c[c.index("--ds_config") + 1]).name for c in map(lambda p: point_command(config, p),
                                                                    grid_points(config))}
    assert files == {f"ti_{b}_{t}.json" for b in ("o", "o2", "o4") for t in ("rte", "mrpc")}
    with pytest.raises(ConfigError, match=r"ds_config: file not found: .*ternarybert_wnli\.json"):
        load_sweep_config(SWEEP_FILE, [f"output_root={tmp_path}", 'axes.tasks=["rte","wnli"]'])
    with pytest.raises(ConfigError, match=r"ds_config: unknown placeholder \{tsk\}"):
        load_sweep_config(SWEEP_FILE, [f"output_root={tmp_path}", "ds_config=ds_configs/paper/x_{tsk}.json"])


# ------------------------------------------------------------------------------ end to end, tiny model


def _stsb_rows(n: int, seed: int) -> list[str]:
    """GLUE STS-B layout; the score is the number of shared words (0-5) of two five-word sentences."""
    words = ["red", "blue", "green", "cat", "dog", "runs", "sits", "big", "small", "old", "new", "tree"]
    rng = random.Random(seed)
    rows = ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"]
    for i in range(n):
        k = rng.randint(0, 5)
        first = rng.sample(words, 5)
        second = first[:k] + rng.sample([w for w in words if w not in first], 5 - k)
        rng.shuffle(second)
        rows.append(f"{i}\tmain-captions\tMSRvid\t2012test\t{i}\tnone\tnone\t{' '.join(first)}\t"
                    f"{' '.join(second)}\t{k:.3f}")
    return rows


def test_stsb_paper_config_selects_and_reports_by_spearman(tmp_path):
    """ternarybert_stsb.json on a tiny BERT and a hand-made STS-B folder: Spearman heads results.json and is the
    metric the best checkpoint was picked by."""
    from tests.tiny import make_tiny_bert, train_env

    glue = tmp_path / "STS-B"
    glue.mkdir()
    (glue / "train.tsv").write_text("\n".join(_stsb_rows(64, 0)) + "\n", encoding="utf-8")
    (glue / "dev.tsv").write_text("\n".join(_stsb_rows(24, 1)) + "\n", encoding="utf-8")
    model = make_tiny_bert(tmp_path / "tiny_bert")
    out = tmp_path / "out"
    args = ("--ds_config", str(PAPER / "ternarybert_stsb.json"), "--output_dir", str(out),
            "--set", "kdqat.seed=3",
            "--set", f"kdqat.model.teacher={model}", "--set", "kdqat.model.teacher_finetune=always",
            "--set", "kdqat.model.local_files_only=true", "--set", "kdqat.data.source=local",
            "--set", f"kdqat.data.data_dir={glue}", "--set", "kdqat.data.max_seq_length=16",
            "--set", "train_micro_batch_size_per_gpu=8", "--set", "tensorboard.enabled=false",
            "--set", "kdqat.finetune.epochs=1", "--set", "kdqat.finetune.learning_rate=1e-3",
            "--set", "kdqat.train.max_steps=6", "--set", "kdqat.logging.eval_every=3",
            "--set", "kdqat.logging.save_every=3", "--set", "kdqat.logging.progress=false")
    done = subprocess.run([sys.executable, str(ROOT / "run" / "train.py"), *args], env=train_env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["task"] == "stsb" and results["primary_metric"] == "spearman"
    assert set(results["student"]) >= {"pearson", "spearman"}
    assert results["steps"]["kdqat"] == 6
    with open(out / "log.csv", encoding="utf-8") as handle:
        dev = [row for row in csv.DictReader(handle) if row["phase"].startswith("kdqat") and row["split"] == "dev"]
    assert len(dev) == 2  # steps 3 and 6
    # the kept student is the dev evaluation with the best Spearman
    assert results["student"]["spearman"] == pytest.approx(max(float(row["spearman"]) for row in dev), abs=1e-4)
