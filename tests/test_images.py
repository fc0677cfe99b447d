"""Image tasks: the digits default (split, upscaling), a folder per class, a hub image dataset, the image format,
their config checks, a teacher built from scratch, and run/train.py end to end on a tiny ViT on digits."""

from __future__ import annotations

import collections
import json
import types

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from ds_kdqat.config import ModelConfig, parse_config
from ds_kdqat.data.config import DataConfig
from ds_kdqat.data.image_encode import ImageFormat, encode_images
from ds_kdqat.data.images import digits_split, load_image_splits
from ds_kdqat.data.tasks import get_task
from ds_kdqat.errors import ConfigError, DataError
from ds_kdqat.models.scratch import build_scratch_model, scratch_config

GRAY32 = types.SimpleNamespace(image_size=32, num_channels=1)


# --- digits -----------------------------------------------------------------------------------------------------
def test_digits_split_is_deterministic_and_stratified():
    from sklearn.datasets import load_digits

    target = load_digits().target
    train, dev = digits_split(0.1, 42)
    assert (train, dev) == digits_split(0.1, 42)
    assert sorted(train + dev) == list(range(1797)) and not set(train) & set(dev)
    per_class = collections.Counter(target.tolist())
    dev_counts = collections.Counter(target[dev].tolist())
    assert dev_counts == {c: int(np.floor(n * 0.1 + 0.5)) for c, n in per_class.items()}
    assert digits_split(0.1, 7)[1] != dev  # the seed changes the split, not its shape
    assert collections.Counter(target[digits_split(0.1, 7)[1]].tolist()) == dev_counts

    config = DataConfig(task="digits", max_train_examples=30, max_eval_examples=20)
    config.validate()
    splits = load_image_splits(config)
    assert splits.class_names == tuple("0123456789") == get_task("digits").labels
    assert [e.source for e in splits.splits["train"]] == [f"digits:{i}" for i in train[:30]]
    assert len(splits.splits["dev"]) == 20
    assert [e.label for e in splits.splits["train"][:12]] == list("0123456789") + ["0", "1"]  # dealt round-robin


def test_digits_are_upscaled_and_normalised():
    splits = load_image_splits(DataConfig(task="digits", max_train_examples=8))
    image = splits.splits["train"][0].open()
    assert (image.mode, image.size) == ("L", (8, 8))
    dataset = encode_images(splits.splits["train"], splits.class_names, ImageFormat.for_model(GRAY32))
    item = dataset[0]
    assert item["pixel_values"].shape == (1, 32, 32) and item["pixel_values"].dtype == torch.float32
    assert -1.0 <= float(item["pixel_values"].min()) and float(item["pixel_values"].max()) <= 1.0
    assert float(item["pixel_values"].min()) == -1.0  # background 0 → (0 − 0.5) / 0.5
    assert item["labels"].item() == int(splits.splits["train"][0].label)
    batch = dataset.collate_fn([dataset[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 1, 32, 32) and batch["labels"].shape == (4,)
    rgb = encode_images(splits.splits["train"][:2], splits.class_names,
                        ImageFormat.for_model(types.SimpleNamespace(image_size=16, num_channels=3)))
    assert rgb[0]["pixel_values"].shape == (3, 16, 16)
    assert torch.equal(rgb[0]["pixel_values"][0], rgb[0]["pixel_values"][2])  # grayscale replicated


# --- a folder per class ---------------------------------------------------------------------------------------
def write_png(path, value: int, size: int = 6) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)


def make_folder(root, train=3, dev=2):
    for split, count in (("train", train), ("dev", dev)):
        for cls, value in (("dog", 200), ("cat", 50), ("owl", 120)):
            for i in range(count):
                write_png(root / split / cls / f"{i}.png", value + i)
    return root


def test_folder_loader_class_names_and_order(tmp_path):
    root = make_folder(tmp_path / "pets")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")  # other files are not read
    (root / "train" / ".hidden").mkdir()
    config = DataConfig(task="image_folder", data_dir=str(root))
    config.validate()
    splits = load_image_splits(config)
    assert splits.class_names == ("cat", "dog", "owl")
    assert [e.label for e in splits.splits["train"]] == ["cat", "dog", "owl"] * 3  # round-robin over classes
    assert splits.splits["train"][0].source == str(root / "train" / "cat" / "0.png")
    dataset = encode_images(splits.splits["dev"], splits.class_names, ImageFormat.for_model(GRAY32))
    assert dataset.labels.tolist() == [0, 1, 2, 0, 1, 2] and dataset.class_names == ("cat", "dog", "owl")
    config.max_train_examples = 4
    assert [e.label for e in load_image_splits(config).splits["train"]] == ["cat", "dog", "owl", "cat"]


def test_folder_loader_errors_name_the_file(tmp_path, caplog):
    root = make_folder(tmp_path / "pets")
    broken = root / "train" / "dog" / "9.png"
    broken.write_bytes(b"\x89PNG not really")
    config = DataConfig(task="image_folder", data_dir=str(root))
    splits = load_image_splits(config)
    with pytest.raises(DataError) as err:
        encode_images(splits.splits["train"], splits.class_names, ImageFormat.for_model(GRAY32))
    assert err.value.source == str(broken) and "cannot be read as an image" in err.value.message
    kept = encode_images(splits.splits["train"], splits.class_names, ImageFormat.for_model(GRAY32), on_bad_row="skip")
    assert len(kept) == 9 and str(broken) in caplog.text

    (root / "dev" / "owl" / "0.png").unlink()
    (root / "dev" / "owl" / "1.png").unlink()
    with pytest.raises(DataError) as err:
        load_image_splits(config)
    assert err.value.source == str(root / "dev" / "owl") and "class folder holds no images" in err.value.message
    (root / "dev" / "owl").rmdir()
    write_png(root / "dev" / "emu" / "0.png", 10)
    with pytest.raises(DataError, match="class 'emu' has no train folder; the classes are the train folders: cat"):
        load_image_splits(config)
    with pytest.raises(DataError, match="no such folder"):
        load_image_splits(DataConfig(task="image_folder", data_dir=str(tmp_path / "nothing")))


# --- a hub dataset ----------------------------------------------------------------------------------------------
class FakeHub:
    """Stands in for datasets.load_dataset: split name -> in-memory Dataset; records the calls."""

    def __init__(self, by_split):
        self.by_split, self.calls = by_split, []

    def __call__(self, *args, split):
        self.calls.append((args, split))
        return self.by_split[split]


def hub_dataset(labels, names=("bird", "cat", "dog"), label_feature=None):
    images = [Image.fromarray(np.full((5, 5, 3), 40 * i, dtype=np.uint8)) for i in range(len(labels))]
    features = datasets.Features({"img": datasets.Image(),
                                  "fine_label": label_feature or datasets.ClassLabel(names=list(names))})
    return datasets.Dataset.from_dict({"img": images, "fine_label": labels}, features=features)


def test_hub_image_loader_with_configured_columns(monkeypatch):
    fake = FakeHub({"train": hub_dataset([2, 0, 1, 2]), "test": hub_dataset([1, 0])})
    monkeypatch.setattr(datasets, "load_dataset", fake)
    config = DataConfig(task="hub_images", hub_id="someone/pets", image_column="img", label_column="fine_label",
                        hub_dev_split="test")
    config.validate()
    splits = load_image_splits(config)
    assert fake.calls == [(("someone/pets",), "train"), (("someone/pets",), "test")]
    assert splits.class_names == ("bird", "cat", "dog")  # ClassLabel order = the hub's class indices
    assert [e.label for e in splits.splits["train"]] == ["dog", "bird", "cat", "dog"]
    assert splits.splits["dev"][1].source == "hub:someone/pets[test]:2"
    dataset = encode_images(splits.splits["train"], splits.class_names,
                            ImageFormat.for_model(types.SimpleNamespace(image_size=8, num_channels=3)))
    assert dataset.labels.tolist() == [2, 0, 1, 2] and dataset[1]["pixel_values"].shape == (3, 8, 8)

    with pytest.raises(DataError, match=r"^hub:someone/pets\[train\]: missing column\(s\) \['image'\]"):
        load_image_splits(DataConfig(task="hub_images", hub_id="someone/pets", label_column="fine_label",
                                     hub_dev_split="test"))


def test_hub_image_loader_plain_labels_and_unlabelled_rows(monkeypatch):
    plain = datasets.Value("string")
    fake = FakeHub({"train": hub_dataset(["b", "a", "b"], label_feature=plain),
                    "validation": hub_dataset(["a", "zebra"], label_feature=plain)})
    monkeypatch.setattr(datasets, "load_dataset", fake)
    config = DataConfig(task="hub_images", hub_id="x/y", image_column="img", label_column="fine_label")
    with pytest.raises(DataError) as err:
        load_image_splits(config)
    assert err.value.source == "hub:x/y[validation]:2" and "not one of the train labels ['a', 'b']" in str(err.value)
    config.on_bad_row = "skip"
    splits = load_image_splits(config)
    assert splits.class_names == ("a", "b") and [e.label for e in splits.splits["dev"]] == ["a"]
    monkeypatch.setattr(datasets, "load_dataset", FakeHub({"train": hub_dataset([0, -1]),
                                                           "validation": hub_dataset([0])}))
    with pytest.raises(DataError, match=r"^hub:x/y\[train\]:2: label -1 is not a class index in \[0, 3\)"):
        load_image_splits(DataConfig(task="hub_images", hub_id="x/y", image_column="img", label_column="fine_label"))


# --- config checks ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, path, fragment", [
    ({"task": "hub_images"}, "kdqat.data.hub_id", "required for task 'hub_images'"),
    ({"task": "digits", "hub_id": "a/b"}, "kdqat.data.hub_id", "only for task 'hub_images'"),
    ({"task": "sst2", "data_dir": "x", "image_column": "img"}, "kdqat.data.image_column", "only for task"),
    ({"task": "image_folder"}, "kdqat.data.data_dir", "required for task 'image_folder'"),
    ({"task": "digits", "data_dir": "x"}, "kdqat.data.data_dir", "use task 'image_folder'"),
    ({"task": "digits", "train_file": "x.tsv"}, "kdqat.data.train_file", "image task"),
    ({"task": "digits", "source": "hub"}, "kdqat.data.source", "use task 'hub_images'"),
    ({"task": "hub_images", "hub_id": ""}, "kdqat.data.hub_id", "non-empty string"),
])
def test_image_data_keys_are_validated(changes, path, fragment):
    with pytest.raises(ConfigError) as err:
        DataConfig(**changes).validate()
    assert err.value.path == path and fragment in err.value.message


def test_hub_images_may_say_source_hub():
    DataConfig(task="hub_images", source="hub", hub_id="cifar10", hub_dev_split="test").validate()


VIT_INIT = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
            "image_size": 8, "patch_size": 4, "num_channels": 1}


@pytest.mark.parametrize("model, path, fragment", [
    ({"teacher": "init:vit", "teacher_finetune": "always"}, "kdqat.model.init_config", "required with teacher"),
    ({"teacher": "init:vit", "init_config": {}}, "kdqat.model.teacher_finetune", 'set "always"'),
    ({"teacher": "some/model", "init_config": {}}, "kdqat.model.init_config", "only for a teacher built from"),
    ({"teacher": "init:"}, "kdqat.model.teacher", "name the model type"),
])
def test_scratch_teacher_keys_are_validated(model, path, fragment):
    with pytest.raises(ConfigError) as err:
        parse_config({"train_micro_batch_size_per_gpu": 4, "kdqat": {"model": model}})
    assert err.value.path == path and fragment in err.value.message


@pytest.mark.parametrize("teacher, init, path, fragment", [
    ("init:gpt2", {}, "kdqat.model.teacher", "no ds-kdqat adapter for model_type 'gpt2'"),
    ("init:vit", {"hiden_size": 8}, "kdqat.model.init_config.hiden_size", "not a vit config key; allowed:"),
    ("init:vit", {"num_labels": 3}, "kdqat.model.init_config.num_labels", "comes from the task"),
    ("init:vit", {"hidden_size": 8.5}, "kdqat.model.init_config.hidden_size", "expected an integer"),
    ("init:vit", {"qkv_bias": 1}, "kdqat.model.init_config.qkv_bias", "expected true or false"),
    ("init:vit", {**VIT_INIT, "hidden_size": 15}, "kdqat.model.init_config.hidden_size", "not a multiple of"),
    ("init:vit", {**VIT_INIT, "patch_size": 3}, "kdqat.model.init_config.patch_size", "does not divide"),
    ("init:vit", {**VIT_INIT, "num_hidden_layers": 0}, "kdqat.model.init_config.num_hidden_layers", ">= 1"),
])
def test_scratch_config_checks_every_key(teacher, init, path, fragment):
    with pytest.raises(ConfigError) as err:
        scratch_config(teacher, init)
    assert err.value.path == path and fragment in err.value.message


def test_scratch_model_is_a_random_init_image_classifier():
    ModelConfig(teacher="init:vit", teacher_finetune="always", init_config=VIT_INIT).validate("kdqat.model")
    model = build_scratch_model(scratch_config("init:vit", VIT_INIT), num_labels=10)
    assert type(model).__name__ == "ViTForImageClassification" and model.config.num_labels == 10
    assert model.config._attn_implementation == "eager"
    assert model(pixel_values=torch.zeros(2, 1, 8, 8)).logits.shape == (2, 10)


def test_image_format_follows_the_models_processor(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "image_mean": [0.2, 0.4, 0.6], "image_std": [0.5, 0.5, 0.5],
        "rescale_factor": 0.5, "resample": 3, "size": {"height": 8, "width": 8}}))
    fmt = ImageFormat.for_model(types.SimpleNamespace(image_size=8, num_channels=1), str(tmp_path))
    assert (fmt.mean, fmt.std, fmt.rescale, fmt.resample) == (pytest.approx((0.4,)), (0.5,), 0.5, 3)
    out = tmp_path / "saved"
    out.mkdir()
    fmt.save_pretrained(str(out))
    assert json.loads((out / "preprocessor_config.json").read_text())["image_mean"] == [0.2, 0.4, 0.6]
    from transformers import ViTConfig

    ImageFormat.for_model(ViTConfig(image_size=32, num_channels=1)).save_pretrained(str(out))  # a ViT one
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(str(out))
    assert list(processor.image_mean) == [0.5] and processor.size["height"] == 32


# --- the pipeline -----------------------------------------------------------------------------------------------
def ds_config(tmp_path, data: dict, teacher: str = "init:vit", **kdqat) -> dict:
    model = {"teacher": teacher, "teacher_finetune": "always", "local_files_only": True}
    if teacher.startswith("init:"):
        model["init_config"] = VIT_INIT
    return {
        "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 0},
        "steps_per_print": 1000000,
        "kdqat": {"output_dir": str(tmp_path / "out"), "seed": 3, "model": model, "data": data,
                  "logging": {"log_every": 2, "save_every": 4, "progress": False}, **kdqat},
    }


def test_prepare_reads_folder_classes_and_checks_input_kinds(tmp_path, monkeypatch):
    from ds_kdqat import pipeline
    from ds_kdqat.training.distributed import DistInfo

    monkeypatch.setattr(pipeline, "init_distributed", lambda: DistInfo(0, 0, 1, "cpu"))
    root = make_folder(tmp_path / "pets")
    ctx = pipeline.prepare(parse_config(ds_config(tmp_path, {"task": "image_folder", "data_dir": str(root)})))
    try:
        assert ctx.spec.labels == ("cat", "dog", "owl") and ctx.spec.num_labels == 3
        assert isinstance(ctx.tokenizer, ImageFormat) and (ctx.tokenizer.height, ctx.tokenizer.channels) == (8, 1)
        assert len(ctx.data.train) == 9 and ctx.data.train[0]["pixel_values"].shape == (1, 8, 8)
    finally:
        ctx.release()

    with pytest.raises(ConfigError) as err:  # a text task for an image model, before the folder is claimed
        pipeline.prepare(parse_config(ds_config(tmp_path / "t", {"task": "sst2", "data_dir": str(tmp_path)})))
    assert err.value.path == "kdqat.data.task" and "the vit teacher takes images" in err.value.message
    assert not (tmp_path / "t" / "out").exists()
    bert = tmp_path / "bert"
    from transformers import BertConfig

    BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               vocab_size=50).save_pretrained(bert)
    with pytest.raises(ConfigError, match="kdqat.data.task: 'digits' is an image task; the bert teacher takes text"):
        pipeline.prepare(parse_config(ds_config(tmp_path / "b", {"task": "digits"}, teacher=str(bert))))
    with pytest.raises(ConfigError, match="kdqat.model.tokenizer: required with teacher 'init:bert'"):
        config = ds_config(tmp_path / "c", {"task": "sst2", "data_dir": str(tmp_path)})
        config["kdqat"]["model"].update(teacher="init:bert",
                                        init_config={"hidden_size": 16, "num_attention_heads": 2})
        pipeline.prepare(parse_config(config))


def test_train_end_to_end_on_digits(tmp_path):
    """run/train.py: a from-scratch tiny ViT teacher on digits, then KD-QAT (ti_gradual, vit_w2), export."""
    from ds_kdqat.pipeline import load_student
    from tests.tiny import run_train

    config = ds_config(tmp_path, {"task": "digits", "max_train_examples": 64, "max_eval_examples": 32},
                       quant={"preset": "vit_w2"}, distill={"recipe": "ti_gradual"},
                       finetune={"epochs": 2, "learning_rate": 2e-3, "optimizer": "adamw"},
                       train={"epochs": 1, "learning_rate": 1e-3, "optimizer": "adamw"})
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    result = run_train(path)
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "digits" and results["primary_metric"] == "accuracy"
    assert 0.0 <= results["student"]["accuracy"] <= 1.0 and results["size"]["wea"] == "2-32-8"
    assert "student accuracy" in result.stdout
    for folder in ("teacher", "student"):
        saved = json.loads((out / folder / "config.json").read_text())
        assert saved["id2label"] == {str(i): str(i) for i in range(10)} and saved["image_size"] == 8
        assert json.loads((out / folder / "preprocessor_config.json").read_text())["size"] == {"height": 8,
                                                                                              "width": 8}
    phases = {row.split(",")[1] for row in (out / "log.csv").read_text().splitlines()[1:]}
    assert {"finetune:supervised", "kdqat:ti_output", "kdqat:kd"} <= phases
    student = load_student(str(out / "student"), get_task("digits")).eval()
    with torch.no_grad():
        assert student(pixel_values=torch.zeros(2, 1, 8, 8)).logits.shape == (2, 10)
