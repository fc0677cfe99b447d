"""Image tasks: the splits of ``digits``, ``image_folder`` and ``hub_images`` as :class:`ImageExample` lists.

* ``digits`` (the offline image default): scikit-learn's bundled 8×8 handwritten digits
  (``sklearn.datasets.load_digits()``, 1,797 images, classes ``"0"``…``"9"``). Each image (values 0…16) becomes an
  8-bit grayscale image (value·255/16, rounded); :mod:`ds_kdqat.data.image_encode` then upscales it to the
  model's image size and channels. The split is deterministic and stratified by class, as ``rt_polarity``'s
  (:func:`ds_kdqat.data.embedded.stratified_split`, ordered by a seeded hash of the pixel values):
  ``dev_fraction`` of each class (default 0.1: 1,618 train / 179 dev), ``split_seed``; each split is dealt
  round-robin over the classes, so the first N (``max_*_examples``) hold every class.
* ``image_folder``: ``data_dir/train/<class>/*`` and ``data_dir/dev/<class>/*`` (files ending in
  :data:`IMAGE_SUFFIXES`, any case; hidden files and other files are not read). The class names are the sorted
  names of the train class folders (stored with the model as ``id2label``); a dev class folder must be one of
  them, and a class folder without images is an error naming the folder. Examples are dealt round-robin over
  the classes (class folders in order, files sorted), so the first N (``max_*_examples``) hold every class.
* ``hub_images``: ``datasets.load_dataset(hub_id, split="train" | hub_dev_split)`` with ``image_column``
  (PIL images, ``{"bytes" | "path"}`` dicts or 8-bit arrays) and ``label_column``. Class names: the label column's
  ``ClassLabel`` names in class-index order, else the sorted distinct train labels (as strings).

Images are decoded when the split is encoded (:meth:`ImageExample.open`); one that cannot be decoded is a
:class:`~ds_kdqat.errors.DataError` naming its file (``hub:<id>[<split>]:<row>``, ``digits:<index>``), or, with
``on_bad_row: "skip"``, left out and logged.
"""

from __future__ import annotations

import io
import itertools
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ds_kdqat.data.config import DataConfig
from ds_kdqat.data.embedded import stratified_split
from ds_kdqat.data.tasks import TaskSpec, get_task
from ds_kdqat.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DIGITS_MAX = 16  # sklearn's digits hold 0..16 (counts of set pixels in 4x4 blocks of the 32x32 originals)


@dataclass(frozen=True)
class ImageExample:
    """One labelled image. ``label``: its class name; ``source``: where it is (a file path,
    ``hub:<id>[<split>]:<row>``, ``digits:<index>``); ``opener()`` decodes it (a ``PIL.Image.Image``)."""

    label: str
    source: str
    opener: Callable[[], Any]

    def open(self):
        """The decoded image; :class:`DataError` at :attr:`source` when it cannot be read as an image."""
        try:
            image = self.opener()
            image.load()
        except DataError:
            raise
        except Exception as error:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, … for bad files
            raise DataError(self.source, f"cannot be read as an image ({type(error).__name__}: {error})") from None
        return image


@dataclass
class ImageSplits:
    """The class names of an image task (class-index order) and its examples by split (``train``, ``dev``)."""

    class_names: tuple[str, ...]
    splits: dict[str, list[ImageExample]]


def load_image_splits(config: DataConfig) -> ImageSplits:
    """Class names and the train and dev examples of the image task ``config.task`` (limits applied)."""
    spec = get_task(config.task)
    if not spec.is_image:
        raise ValueError(f"task {spec.name!r} is not an image task")
    loader = IMAGE_LOADERS[spec.name]
    class_names, splits = loader(config, spec)
    for split, limit in (("train", config.max_train_examples), *((s, config.max_eval_examples)
                                                                 for s in spec.eval_splits)):
        if limit is not None:
            splits[split] = splits[split][:limit]
    return ImageSplits(tuple(class_names), splits)


# --- digits ---------------------------------------------------------------------------------------------------
def _digit_image(pixels: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.rint(pixels * (255.0 / DIGITS_MAX)).astype(np.uint8))  # 2-D uint8: mode "L"


def digits_split(dev_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, dev indices) into ``load_digits()``: stratified by class, deterministic for a seed, each
    dealt round-robin over the classes (in the split's hashed order within a class)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = [str(t) for t in digits.target]
    keys = [",".join(str(int(v)) for v in image.ravel()) for image in digits.images]
    train, dev = stratified_split(labels, keys, dev_fraction, seed)

    def dealt(indices: list[int]) -> list[int]:
        per_class = [[i for i in indices if labels[i] == c] for c in sorted(set(labels))]
        return [i for group in itertools.zip_longest(*per_class) for i in group if i is not None]

    return dealt(train), dealt(dev)


def _digits(config: DataConfig, spec: TaskSpec):
    from sklearn.datasets import load_digits

    digits = load_digits()
    train, dev = digits_split(config.dev_fraction, config.split_seed)

    def examples(indices):
        return [ImageExample(str(int(digits.target[i])), f"digits:{i}", partial(_digit_image, digits.images[i]))
                for i in indices]

    return spec.labels, {"train": examples(train), "dev": examples(dev)}


# --- a folder per class -----------------------------------------------------------------------------------------
def _open_file(path: Path):
    from PIL import Image

    return Image.open(path)


def _class_folders(split_dir: Path) -> list[Path]:
    if not split_dir.is_dir():
        raise DataError(str(split_dir), "no such folder (task image_folder reads data_dir/train/<class>/ and "
                                        "data_dir/dev/<class>/)")
    return sorted((p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(str(folder), f"class folder holds no images ({', '.join('*' + s for s in IMAGE_SUFFIXES)})")
    return files


def _round_robin(per_class: list[list[ImageExample]]) -> list[ImageExample]:
    out: list[ImageExample] = []
    for i in range(max((len(c) for c in per_class), default=0)):
        out.extend(c[i] for c in per_class if i < len(c))
    return out


def _folder(config: DataConfig, spec: TaskSpec):
    root = Path(config.data_dir)
    train_dir = root / "train"
    class_names = [p.name for p in _class_folders(train_dir)]
    if len(class_names) < 2:
        raise DataError(str(train_dir), f"needs at least two class folders, found {class_names}")
    splits = {}
    for split in spec.splits:
        per_class = []
        for folder in _class_folders(root / spec.split_files[split]):
            if folder.name not in class_names:
                raise DataError(str(folder), f"class {folder.name!r} has no train folder; the classes are the "
                                             f"train folders: {', '.join(class_names)}")
            per_class.append([ImageExample(folder.name, str(path), partial(_open_file, path))
                              for path in _image_files(folder)])
        if not per_class:
            raise DataError(str(root / spec.split_files[split]), "no class folders")
        splits[split] = _round_robin(per_class)
    return class_names, splits


# --- a hub dataset ----------------------------------------------------------------------------------------------
def _hub_image(dataset, row: int, column: str):
    from PIL import Image

    value = dataset[row][column]
    if hasattr(value, "load") and hasattr(value, "mode"):  # a PIL image (datasets' Image feature)
        return value
    if isinstance(value, dict) and value.get("bytes") is not None:
        return Image.open(io.BytesIO(value["bytes"]))
    if isinstance(value, dict) and value.get("path"):
        return Image.open(value["path"])
    array = np.asarray(value)
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.integer) or array.size == 0 or array.min() < 0 or array.max() > 255:
            raise ValueError(f"a {array.dtype} pixel array; expected 8-bit values (0..255)")
        array = array.astype(np.uint8)
    return Image.fromarray(array)


def _hub_label(value: Any, names: Optional[list[str]], class_names: list[str]) -> tuple[Optional[str], str]:
    if names is not None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < len(names):
            return None, f"label {value!r} is not a class index in [0, {len(names)}) (unlabelled split?)"
        return names[int(value)], ""
    if value is None or isinstance(value, bool) or str(value) not in class_names:
        return None, f"label {value!r} is not one of the train labels {class_names}"
    return str(value), ""


def _hub(config: DataConfig, spec: TaskSpec):
    import datasets  # heavy; only needed here

    image_column, label_column = config.image_column or "image", config.label_column or "label"
    hub_splits = {"train": "train", "dev": config.hub_dev_split or "validation"}
    loaded = {}
    for split, hub_split in hub_splits.items():
        source = f"hub:{config.hub_id}[{hub_split}]"
        dataset = datasets.load_dataset(config.hub_id, split=hub_split)
        missing = [c for c in (image_column, label_column) if c not in dataset.column_names]
        if missing:
            raise DataError(source, f"missing column(s) {missing}; found {dataset.column_names} (set "
                                    "kdqat.data.image_column / label_column)")
        loaded[split] = (source, dataset)
    train = loaded["train"][1]
    names = getattr(train.features.get(label_column), "names", None)
    if names is not None:
        class_names = [str(n) for n in names]
    else:
        values = {v for v in train[label_column] if v is not None and not isinstance(v, bool)}
        numeric = all(isinstance(v, (int, np.integer)) for v in values)
        class_names = [str(v) for v in sorted(values, key=(int if numeric else str))]
    if len(class_names) < 2:
        raise DataError(loaded["train"][0], f"needs at least two classes in column {label_column!r}, found "
                                            f"{class_names}")
    splits = {}
    for split, (source, dataset) in loaded.items():
        examples, bad = [], 0
        for i, value in enumerate(dataset[label_column]):
            label, reason = _hub_label(value, names, class_names)
            if label is None:
                if config.on_bad_row == "error":
                    raise DataError(f"{source}:{i + 1}", reason)
                logger.warning("skipped bad row %s:%d: %s", source, i + 1, reason)
                bad += 1
                continue
            examples.append(ImageExample(label, f"{source}:{i + 1}", partial(_hub_image, dataset, i, image_column)))
        if not examples:
            raise DataError(source, f"no usable rows ({bad} bad)")
        splits[split] = examples
    return class_names, splits


# task name -> (config, spec) -> (class names, {split: examples})
IMAGE_LOADERS: dict[str, Callable[[DataConfig, TaskSpec], tuple[list[str], dict[str, list[ImageExample]]]]] = {
    "digits": _digits,
    "image_folder": _folder,
    "hub_images": _hub,
}
