"""The ``ds-kdqat`` command: subcommands, their options, the shared exit statuses, and the run/ shims."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from ds_kdqat import cli
from ds_kdqat.commands import COMMANDS
from ds_kdqat.errors import ConfigError, DataError, OutputFolderError
from tests.tiny import REPO, train_env

# Each subcommand's --help names every option its run/ script had before the single command existed.
OPTIONS = {
    "train": ["--ds_config", "--deepspeed_config", "--set", "--output_dir", "--overwrite", "--resume-anyway",
              "--resume_anyway"],
    "finetune": ["--ds_config", "--deepspeed_config", "--set", "--output_dir", "--overwrite", "--resume-anyway"],
    "augment": ["--task", "--input", "--output", "--M", "--num_candidates", "--p", "--replace_prob", "--N",
                "--num_new", "--seed", "--candidate_source", "--stopwords", "--glove", "--glove_format",
                "--glove_vocab_size", "--mlm_model", "--mlm_head", "--mlm_input", "--batch_size",
                "--max_seq_length", "--device", "--mlm_precision", "--num_workers", "--shard_index", "--num_shards",
                "--chunk_size", "--chunks_per_group", "--parts_dir", "--on_bad_row", "--no_progress", "--no_merge",
                "--merge_only"],
    "fit-mlm-head": ["--text", "--task", "--task_file", "--on_bad_row", "--model", "--output", "--rounds",
                     "--epochs", "--max_steps", "--lr", "--batch_size", "--max_seq_length", "--holdout", "--seed",
                     "--threads", "--device", "--unfreeze_layers", "--encoder_lr", "--warmup", "--weight_decay",
                     "--sentence_batch", "--eval_words", "--eval_input"],
    "analyze": ["--teacher", "--student", "--quant_config", "--no_quantized", "--task", "--text_file", "--data_dir",
                "--split", "--max_seq_length", "--run_dir", "--output_dir", "--config", "--set", "--device"],
    "sweep": ["--config", "--set", "--slurm", "--run-index", "--aggregate-only", "--list", "--dry-run"],
    "launch": ["--num_accelerators", "--master_port"],  # the launcher wrapper's own usage text
    "predict": ["--input", "--format", "--text_columns", "--text_column", "--label_column", "--output",
                "--output_format", "--overwrite", "--backend", "--weights", "--compile", "--batch_size", "--eval",
                "--no_progress"],
    "export": ["--out", "--onnx", "--ternary_packing", "--overwrite", "--task", "--labels", "--task_type",
               "--text_columns", "--max_seq_length"],
    "estimate": ["--ds_config", "--set", "--model", "--layers", "--hidden", "--heads", "--ffn", "--vocab", "--family",
                 "--seq", "--world_size", "--gpu_memory", "--device", "--activation_checkpointing", "--json"],
}


def run_console(args, **kwargs):
    return subprocess.run(args, env=train_env(), capture_output=True, text=True, timeout=120, cwd=REPO, **kwargs)


def help_of(command, capsys) -> str:
    """The --help text of ``ds-kdqat COMMAND``; asserts that it exits 0."""
    try:
        status = cli.main([command, "--help"])
    except SystemExit as stop:  # argparse's --help
        status = stop.code
    assert status == 0
    return capsys.readouterr().out


def test_the_console_script_and_python_m_list_every_subcommand():
    script = Path(sys.executable).parent / "ds-kdqat"
    assert script.is_file(), "the console script is missing: pip install --no-deps -e ."
    for command in ([str(script), "--help"], [sys.executable, "-m", "ds_kdqat", "--help"]):
        result = run_console(command)
        assert result.returncode == 0, result.stderr
        for name in COMMANDS:
            assert f"\n    {name} " in result.stdout or f"\n    {name}\n" in result.stdout, (name, result.stdout)
    assert set(COMMANDS) == set(OPTIONS)


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_each_subcommand_help_exits_0_and_shows_its_options(command, capsys):
    text = help_of(command, capsys)
    for option in OPTIONS[command]:
        assert option in text, f"{command} --help lacks {option}"


def test_train_config_error_exits_2_naming_the_key():
    script = Path(sys.executable).parent / "ds-kdqat"
    result = run_console([str(script), "train", "--ds_config", "ds_configs/ternary.json",
                          "--set", "kdqat.distill.recipe=mapp"])
    assert result.returncode == 2
    assert result.stderr.startswith("ds-kdqat config error: kdqat.distill.recipe: ")
    assert "Traceback" not in result.stderr


def test_analyze_config_error_exits_2_naming_the_key(tmp_path, capsys):
    status = cli.main(["analyze", "--run_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"),
                       "--set", "cover_top_k=0"])
    assert status == 2
    assert capsys.readouterr().err.startswith("ds-kdqat config error: analysis.cover_top_k: ")
    assert not (tmp_path / "out").exists()


def test_analyze_without_anything_to_analyse_is_a_config_error(tmp_path, capsys):
    assert cli.main(["analyze", "--output_dir", str(tmp_path)]) == 2
    assert "ds-kdqat config error: --teacher/--run_dir: " in capsys.readouterr().err


def test_augment_missing_input_exits_2(tmp_path, capsys):
    missing = tmp_path / "nope.tsv"
    status = cli.main(["augment", "--task", "sst2", "--input", str(missing), "--output", str(tmp_path / "o.tsv"),
                       "--no_progress"])
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("ds-kdqat ") and " error: " in err and str(missing) in err


def test_augment_shims_find_the_augment_package(tmp_path):
    """run/ is first on a script's sys.path, where run/augment.py could hide the augment package."""
    missing = tmp_path / "nope.tsv"
    result = run_console([sys.executable, "run/augment.py", "--task", "sst2", "--input", str(missing)])
    assert result.returncode == 2 and result.stderr.startswith("ds-kdqat config error: augment.input: "), result.stderr
    result = run_console([sys.executable, "run/fit_mlm_head.py", "--help"])
    assert result.returncode == 0 and "--holdout" in result.stdout, result.stderr


def test_sweep_missing_file_exits_2(tmp_path, capsys):
    assert cli.main(["sweep", "--config", str(tmp_path / "none.yaml"), "--list"]) == 2
    assert capsys.readouterr().err.startswith("ds-kdqat config error: ")


def test_usage_errors_exit_2():
    for argv in (["bogus"], [], ["train"], ["sweep", "--config", "x", "--list", "--slurm"]):
        with pytest.raises(SystemExit) as stop:
            cli.main(argv)
        assert stop.value.code == 2


@pytest.mark.parametrize("error, line", [
    (ConfigError("kdqat.quant.bits", "got 3"), "ds-kdqat config error: kdqat.quant.bits: got 3"),
    (DataError("train.tsv:7", "2 fields, expected 3"), "ds-kdqat data error: train.tsv:7: 2 fields, expected 3"),
    (OutputFolderError("out", "held by another job"), "ds-kdqat output folder error: out: held by another job"),
    (FileNotFoundError(2, "No such file or directory", "in.tsv"), "ds-kdqat data error: in.tsv: No such file or directory"),
])
def test_input_errors_map_to_2_with_one_line(error, line, capsys):
    def job(args):
        raise error

    assert cli.run_command(job, argparse.Namespace()) == cli.EXIT_INPUT == 2
    assert capsys.readouterr().err == line + "\n"


def test_signals_bugs_and_stop_training(capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    def buggy(args):
        raise RuntimeError("oops")

    def stopped(args):
        raise SystemExit(143)  # what StopTraining is

    assert cli.run_command(interrupted, argparse.Namespace()) == cli.EXIT_STOPPED == 143
    assert cli.run_command(buggy, argparse.Namespace()) == cli.EXIT_BUG == 1
    assert "Traceback" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        cli.run_command(stopped, argparse.Namespace())
    assert stop.value.code == 143


def test_train_swallows_the_launchers_local_rank():
    args = cli.build_parser("train").parse_args(["train", "--local_rank=3", "--ds_config", "c.json", "--set", "a=1"])
    assert (args.ds_config, args.overrides, args.local_rank) == ("c.json", ["a=1"], 3)


def test_launch_hands_every_word_to_the_launcher():
    words = ["--num_accelerators", "2", "--master_port=2950", "run/train.py", "--ds_config", "c.json", "--", "-h"]
    assert cli.build_parser("launch").parse_args(["launch", *words]).argv == words


def test_main_train_and_main_finetune_prepend_their_command(capsys):
    for entry, name in ((cli.main_train, "train"), (cli.main_finetune, "finetune")):
        with pytest.raises(SystemExit) as stop:
            entry(["--help"])
        assert stop.value.code == 0 and f"usage: ds-kdqat {name} " in capsys.readouterr().out


def test_run_scripts_are_shims_and_no_sys_path_insert_is_left():
    for folder in ("run", "bench"):
        for path in (REPO / folder).glob("*.py"):
            assert "sys.path.insert" not in path.read_text(), path
    for name, (module, _) in COMMANDS.items():
        text = (REPO / "run" / f"{module}.py").read_text()
        assert f'command_main("{name}")' in text and len(text.splitlines()) <= 12, module


def test_run_launch_help_through_the_shim():
    result = run_console([sys.executable, "run/launch.py", "--help"])
    assert result.returncode == 0 and "--num_accelerators" in result.stdout
