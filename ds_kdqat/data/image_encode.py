"""Images to ``pixel_values``: the model's input format (:class:`ImageFormat`) and a torch Dataset of a split.

:class:`ImageFormat` is the image counterpart of a tokenizer, taken from the model: its config's ``image_size``
and ``num_channels`` (1 → grayscale ``"L"``, 3 → ``"RGB"``), and, when the model comes with an image processor
(``preprocessor_config.json``), that processor's ``image_mean``/``image_std``, ``rescale_factor`` and
``resample``; without one (a teacher built from scratch) fixed values: mean 0.5, std 0.5 per channel, rescale
1/255, bilinear — ViTImageProcessor's defaults, i.e. pixels in [-1, 1]. Each image is converted to the channels,
resized to ``image_size`` (digits: 8×8 → 32×32 upscaled), rescaled and normalised:
``(value·rescale − mean) / std``. (A processor's other steps — centre crop, …— are not applied.)
:meth:`ImageFormat.save_pretrained` writes the matching ``preprocessor_config.json`` (the model's own processor
config when it had one) next to the saved teacher and student, where a tokenizer goes for text.

:class:`ImageDataset` keeps the resized images as uint8 (N·C·H·W bytes: digits at 1×32×32, 1.8 MB; CIFAR-10 at
3×224×224 would be 7.5 GB — large datasets want a lazy dataset, not written yet) and normalises per item.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ds_kdqat.data.images import ImageExample
from ds_kdqat.errors import DataError

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
PROCESSOR_FILE = "preprocessor_config.json"
DEFAULT_MEAN = 0.5
DEFAULT_STD = 0.5
DEFAULT_RESCALE = 1 / 255
BILINEAR = 2  # PIL.Image.Resampling.BILINEAR, as HF image processors store it
_MODES = {1: "L", 3: "RGB"}


def _per_channel(values: Any, channels: int, what: str) -> tuple[float, ...]:
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    if len(values) == channels:
        return tuple(values)
    if len(values) == 1:
        return tuple(values * channels)
    if channels == 1:  # an RGB processor's statistics for a grayscale model: their mean
        return (sum(values) / len(values),)
    raise ValueError(f"{what} has {len(values)} values for a model with {channels} channels")


def read_processor_config(source: Optional[str], local_files_only: bool = False) -> Optional[dict]:
    """The ``preprocessor_config.json`` of a model folder or hub id, or None when it has none."""
    if source is None:
        return None
    path = os.path.join(source, PROCESSOR_FILE)
    if not os.path.isdir(source):
        try:
            from transformers.utils import cached_file

            path = cached_file(source, PROCESSOR_FILE, local_files_only=local_files_only,
                               _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
        except OSError:
            path = None
    if not path or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


@dataclass(frozen=True)
class ImageFormat:
    """What the model takes: ``channels`` × ``height`` × ``width`` pixels normalised with ``mean``/``std`` per
    channel after ``rescale``; images are resized with PIL resampling filter ``resample``. ``processor``: the
    model's own ``preprocessor_config.json`` (saved back unchanged), or None (a ViT-style one is written)."""

    height: int
    width: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    rescale: float = DEFAULT_RESCALE
    resample: int = BILINEAR
    processor: Optional[dict] = None
    processor_type: str = "ViTImageProcessor"

    def __post_init__(self) -> None:
        if self.channels not in _MODES:
            raise ValueError(f"num_channels {self.channels}: images are read as grayscale (1) or RGB (3)")
        if len(self.mean) != self.channels or len(self.std) != self.channels or not all(s > 0 for s in self.std):
            raise ValueError(f"mean {self.mean} / std {self.std} must have {self.channels} values, std > 0")

    @classmethod
    def for_model(cls, model_config: Any, source: Optional[str] = None,
                  local_files_only: bool = False) -> "ImageFormat":
        """The format of a model with HF config ``model_config`` whose files (and image processor, if any) are at
        ``source`` (a folder or hub id; None for a model built from scratch)."""
        size = model_config.image_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        channels = int(getattr(model_config, "num_channels", 3))
        processor = read_processor_config(source, local_files_only)
        mean, std, rescale, resample = DEFAULT_MEAN, DEFAULT_STD, DEFAULT_RESCALE, BILINEAR
        if processor is not None:
            if processor.get("do_normalize", True):
                mean, std = processor.get("image_mean", mean), processor.get("image_std", std)
            else:
                mean, std = 0.0, 1.0
            rescale = float(processor.get("rescale_factor", rescale)) if processor.get("do_rescale", True) else 1.0
            resample = int(processor.get("resample", resample))
        name = type(model_config).__name__  # ViTConfig -> ViTImageProcessor (what AutoImageProcessor reads)
        processor_type = name[:-len("Config")] + "ImageProcessor" if name.endswith("Config") else cls.processor_type
        return cls(int(height), int(width), channels, _per_channel(mean, channels, "image_mean"),
                   _per_channel(std, channels, "image_std"), rescale, resample, processor, processor_type)

    def pixels(self, image) -> np.ndarray:
        """A PIL image as uint8 (C, H, W): converted to the channels and resized."""
        from PIL import Image

        image = image.convert(_MODES[self.channels])
        if image.size != (self.width, self.height):
            image = image.resize((self.width, self.height), resample=Image.Resampling(self.resample))
        array = np.asarray(image, dtype=np.uint8)
        return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)

    @functools.cached_property
    def _affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        return self.rescale / std, -mean / std

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (..., C, H, W) → float32 ``(value·rescale − mean) / std``."""
        scale, shift = self._affine
        return pixels.float() * scale + shift

    def processor_config(self) -> dict:
        """What :meth:`save_pretrained` writes."""
        if self.processor is not None:
            return dict(self.processor)
        return {"image_processor_type": self.processor_type, "do_resize": True,
                "size": {"height": self.height, "width": self.width}, "resample": self.resample,
                "do_rescale": True, "rescale_factor": self.rescale, "do_normalize": True,
                "image_mean": list(self.mean), "image_std": list(self.std)}

    def save_pretrained(self, folder: str) -> None:
        """Write ``preprocessor_config.json`` into ``folder`` (where a text model's tokenizer files go)."""
        with open(os.path.join(folder, PROCESSOR_FILE), "w", encoding="utf-8") as handle:
            json.dump(self.processor_config(), handle, indent=2, sort_keys=True)
            handle.write("\n")


class ImageDataset(Dataset):
    """Encoded images of one split. ``dataset[i]``: ``pixel_values`` float32 (C, H, W) and ``labels`` int64
    scalar (class index into :attr:`class_names`); :attr:`collate_fn` stacks items into a batch."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, image_format: ImageFormat,
                 class_names: Sequence[str]):
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[0] != labels.shape[0]:
            raise ValueError(f"pixels must be uint8 (N, C, H, W) with one label each; got {tuple(pixels.shape)} "
                             f"{pixels.dtype} and {tuple(labels.shape)} labels")
        self.pixels = pixels
        self.labels = labels
        self.image_format = image_format
        self.class_names = tuple(class_names)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> Batch:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        return {"pixel_values": self.image_format.normalize(self.pixels[index]), "labels": self.labels[index]}

    @property
    def collate_fn(self) -> Callable[[Sequence[Batch]], Batch]:
        return collate_images


def collate_images(batch: Sequence[Batch]) -> Batch:
    """Stack :class:`ImageDataset` items: ``pixel_values`` (B, C, H, W) float32, ``labels`` (B,) int64."""
    if not batch:
        raise ValueError("empty batch")
    return {"pixel_values": torch.stack([item["pixel_values"] for item in batch]),
            "labels": torch.stack([item["labels"] for item in batch])}


def encode_images(examples: Sequence[ImageExample], class_names: Sequence[str], image_format: ImageFormat,
                  on_bad_row: str = "error") -> ImageDataset:
    """Decode, convert and resize every example (:meth:`ImageFormat.pixels`) into an :class:`ImageDataset`.

    A label that is not a class name, or an image that cannot be decoded, is a :class:`DataError` naming the
    example's source; with ``on_bad_row="skip"`` the example is left out and logged.
    """
    index = {name: i for i, name in enumerate(class_names)}
    pixels, labels, bad = [], [], 0
    for example in examples:
        try:
            if example.label not in index:
                raise DataError(example.source, f"unknown class {example.label!r} (classes: {list(class_names)})")
            pixels.append(image_format.pixels(example.open()))
        except DataError as error:
            if on_bad_row != "skip":
                raise
            logger.warning("skipped bad image %s", error)
            bad += 1
            continue
        labels.append(index[example.label])
    if not pixels:
        raise DataError(examples[0].source if examples else "images", f"no usable images ({bad} bad)")
    if bad:
        logger.warning("skipped %d bad images in all", bad)
    return ImageDataset(torch.from_numpy(np.stack(pixels)), torch.tensor(labels, dtype=torch.int64), image_format,
                        class_names)
