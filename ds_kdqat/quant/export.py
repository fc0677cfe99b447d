"""Packed export of a quantized model, loading it back, and TernaryBERT-style size reports.

Layout of an export directory::

    weights.safetensors   "<module>.weight.codes"  uint8, packed codes (see ds_kdqat.quant.packing)
                          "<module>.weight.scale"  float32, () or (rows, 1): α, or the uniform scale
                          "<module>.weight.offset" float32, min-max only: the minimum
                          every other state-dict entry under its own name, as it is (dtype kept)
    manifest.json         format/version, the QuantConfig, one entry per quantized weight (kind, bits, shape,
                          packing, number of codes), the W-E-A bits, the fp32 size, and (version 2) ``files``:
                          the size and SHA-256 of every other file of the folder, checked on load

Codes are stored unsigned, as each weight's method encodes them (:mod:`ds_kdqat.quant.methods`): ternary
``b + 1`` ∈ {0, 1, 2} (2 bits, or base-3 5-per-byte), binary ``(b + 1)/2`` (1 bit), symmetric
``q + 2^(b−1) − 1`` and min-max ``q`` (``bits`` bits). Decoding applies the forward's own arithmetic to the same
codes and scales, so the loaded weights equal the fake-quantized ones.

Activation quantizers with learned tensors (LSQ) store them as ``"<quantizer module>.<name>"`` float32
tensors (LSQ: ``….step``, the step size s) instead of their state-dict entries, and the manifest lists them
under ``"activations"`` (method, bits, mode, tensor names); exports without such quantizers have no
``"activations"`` key. Both files are written atomically (:func:`ds_kdqat.fileio.atomic_write_via`), the
manifest last.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional, Union

import safetensors.torch
import torch
from torch import nn

from ds_kdqat.errors import DataError
from ds_kdqat.fileio import atomic_write_text, atomic_write_via, sha256_file
from ds_kdqat.quant.config import quant_config_from_dict
from ds_kdqat.quant.convert import model_quant_config, quantize_model
from ds_kdqat.quant.functional import TERNARY_ENTROPY_BITS
from ds_kdqat.quant.methods import QUANT_METHODS
from ds_kdqat.quant.modules import QUANT_MODULE_TYPES, ActQuantizer, QuantEmbedding, QuantLinear
from ds_kdqat.quant.packing import pack_base3, pack_bits, unpack_base3, unpack_bits

FORMAT = "ds-kdqat-packed"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: no "files" checksums
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
TernaryPacking = Literal["2bit", "base3"]
MIB = 2**20


@dataclass
class SizeReport:
    """Sizes in the style of TernaryBERT's tables: ``W-E-A`` bits, size, compression ratio to fp32.

    ``packed_bytes``: the export directory's files; ``fp32_bytes``: every state-dict tensor at 4 bytes per
    element (the fp32 checkpoint's data); ``floor_bytes``: the same export with ternary codes at the
    information floor log2 3 ≈ 1.585 bits each.
    """

    weight_bits: str
    embedding_bits: str
    activation_bits: str
    packed_bytes: int
    fp32_bytes: int
    floor_bytes: int
    ternary_weights: int

    @property
    def wea(self) -> str:
        return f"{self.weight_bits}-{self.embedding_bits}-{self.activation_bits}"

    @property
    def ratio(self) -> float:
        return self.fp32_bytes / self.packed_bytes

    @property
    def floor_ratio(self) -> float:
        return self.fp32_bytes / self.floor_bytes

    def row(self) -> str:
        return (f"W-E-A {self.wea}: {self.packed_bytes / MIB:.1f} MiB (x{self.ratio:.1f} vs fp32 "
                f"{self.fp32_bytes / MIB:.1f} MiB); ternary floor {self.floor_bytes / MIB:.1f} MiB "
                f"(x{self.floor_ratio:.1f})")


def _bits_label(values: set[int]) -> str:
    return "/".join(str(v) for v in sorted(values)) if values else "32"


def _wea_bits(model: nn.Module) -> tuple[str, str, str]:
    weight, embedding, act = set(), set(), set()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            weight.add(module.weight_quant.bits)
        elif isinstance(module, QuantEmbedding):
            embedding.add(module.weight_quant.bits)
        elif isinstance(module, ActQuantizer):
            act.add(module.bits)
    return _bits_label(weight), _bits_label(embedding), _bits_label(act)


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)


def _fp32_bytes(state: dict[str, torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in state.values():
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * 4
    return total


def _learned_activations(model: nn.Module) -> dict[str, ActQuantizer]:
    """``name`` → activation quantizer holding learned tensors (first name of a shared one), in module order."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, ActQuantizer) and m.quantizer.export_state(m)}


def _state_keys_of(model: nn.Module, quantizers: dict[str, ActQuantizer]) -> set[str]:
    """The state-dict keys of ``quantizers`` under every name they are registered at."""
    ids = {id(m) for m in quantizers.values()}
    return {f"{prefix}.{key}" for prefix, m in model.named_modules(remove_duplicate=False) if id(m) in ids
            for key in m.state_dict()}


@torch.no_grad()
def export_packed(model: nn.Module, out_dir: Union[str, os.PathLike], *,
                  ternary_packing: TernaryPacking = "2bit", extra: Optional[dict] = None) -> SizeReport:
    """Write ``model`` (converted by :func:`quantize_model`) to ``out_dir`` in packed form; return its sizes.

    ``extra``: more manifest keys (the self-contained export's ``task`` and ``model``,
    :mod:`ds_kdqat.deploy.artifact`). The manifest lists every file already in ``out_dir`` with its checksum.

    Under ZeRO-3, gather the parameters first (``deepspeed.zero.GatheredParameters``) or export from the
    engine's consolidated state. A non-quantized state-dict entry that shares storage with a quantized weight
    (a tied output layer) is refused: its fp32 values would be lost.
    """
    if ternary_packing not in ("2bit", "base3"):
        raise ValueError(f"ternary_packing must be '2bit' or 'base3', got {ternary_packing!r}")
    config = model_quant_config(model)
    if config is None:
        raise ValueError(f"{type(model).__name__} is not quantized; call quantize_model(model, config) first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    quant_storage = {}
    ternary_weights = 0
    for name, module in model.named_modules():
        if not isinstance(module, QUANT_MODULE_TYPES):
            continue
        key = f"{name}.weight"
        weight = module.weight
        quant_storage[_storage_key(weight)] = key
        parts = module.weight_quant.parts(weight)
        codes = QUANT_METHODS[module.weight_quant.method].encode(parts)
        base3 = parts.kind == "ternary" and ternary_packing == "base3"
        tensors[f"{key}.codes"] = pack_base3(codes) if base3 else pack_bits(codes, parts.bits)
        tensors[f"{key}.scale"] = parts.scale.detach().float().cpu().contiguous()
        if parts.offset is not None:
            tensors[f"{key}.offset"] = parts.offset.detach().float().cpu().contiguous()
        entries[key] = {"kind": parts.kind, "bits": parts.bits, "shape": list(weight.shape),
                        "count": weight.numel(), "packing": "base3" if base3 else "bits",
                        "method": module.weight_quant.method, "granularity": module.weight_quant.granularity,
                        "dtype": str(weight.dtype).removeprefix("torch.")}
        if parts.kind == "ternary":
            ternary_weights += weight.numel()

    activations: dict[str, dict] = {}
    learned = _learned_activations(model)
    for name, quantizer in learned.items():
        stored = quantizer.quantizer.export_state(quantizer)
        for suffix, value in stored.items():
            tensors[f"{name}.{suffix}"] = value.contiguous()
        activations[name] = {"method": quantizer.method, "bits": quantizer.bits, "mode": quantizer.mode,
                             "tensors": sorted(stored)}
    learned_keys = _state_keys_of(model, learned)

    state = model.state_dict()
    for key, value in state.items():
        if key in entries or key in learned_keys:
            continue
        owner = quant_storage.get(_storage_key(value))
        if owner is not None:
            raise ValueError(f"{key!r} shares its storage with the quantized weight {owner!r} (tied weights); "
                             "untie it or quantize both before exporting")
        tensors[key] = value.detach().cpu().contiguous().clone()

    w_bits, e_bits, a_bits = _wea_bits(model)
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "weights_file": WEIGHTS_FILE,
        "quant_config": config.to_dict(), "ternary_packing": ternary_packing,
        "bits": {"weights": w_bits, "embedding": e_bits, "activations": a_bits},
        "fp32_bytes": _fp32_bytes(state), "ternary_weights": ternary_weights, "quantized": entries,
    }
    if activations:
        manifest["activations"] = activations
    for key, value in (extra or {}).items():
        if key in manifest:
            raise ValueError(f"extra manifest key {key!r} is one export_packed writes itself")
        manifest[key] = value
    atomic_write_via(out / WEIGHTS_FILE,
                     lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata={"format": FORMAT}))
    manifest["files"] = file_checksums(out)
    atomic_write_text(out / MANIFEST_FILE, json.dumps(manifest, indent=1))
    return size_report(out)


def file_checksums(folder: Union[str, os.PathLike]) -> dict[str, dict]:
    """``relative path`` → ``{"bytes", "sha256"}`` of every file under ``folder`` but the manifest."""
    root = Path(folder)
    return {str(path.relative_to(root)): {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
            for path in sorted(root.rglob("*")) if path.is_file() and path.name != MANIFEST_FILE
            and not path.name.startswith(".")}


def verify_files(out_dir: Union[str, os.PathLike], manifest: dict) -> None:
    """Check every file the manifest lists: present, of its size, of its SHA-256. Raises
    :class:`~ds_kdqat.errors.DataError` naming the first file that is not (a version-1 export lists none)."""
    out = Path(out_dir)
    for name, entry in manifest.get("files", {}).items():
        path = out / name
        if not path.is_file():
            raise DataError(str(path), "missing; the export's manifest lists it")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise DataError(str(path), f"{size} bytes, the manifest says {entry['bytes']} (truncated or replaced)")
        if sha256_file(path) != entry["sha256"]:
            raise DataError(str(path), "checksum mismatch (the file changed after export: damaged or edited)")


def read_manifest(out_dir: Union[str, os.PathLike]) -> dict:
    path = Path(out_dir) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no packed export here (missing {MANIFEST_FILE})") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}", f"invalid JSON: {err.msg}") from None
    if (not isinstance(manifest, dict) or manifest.get("format") != FORMAT
            or manifest.get("version") not in READABLE_VERSIONS):
        got = manifest if not isinstance(manifest, dict) else manifest.get("format"), \
            None if not isinstance(manifest, dict) else manifest.get("version")
        raise DataError(str(path), f"expected format {FORMAT!r} version {'/'.join(map(str, READABLE_VERSIONS))}, "
                        f"got {got[0]!r} version {got[1]!r}")
    for key in ("weights_file", "quant_config", "quantized", "bits", "fp32_bytes", "ternary_weights"):
        if key not in manifest:
            raise DataError(str(path), f"no {key!r} entry")
    return manifest


def unpacked_weight(out_dir: Union[str, os.PathLike], key: str, entry: dict,
                    tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Pop quantized weight ``key``'s pieces from ``tensors``: ``(codes, scale, offset)`` with ``codes``
    unsigned (uint8) in the weight's shape. Raises :class:`~ds_kdqat.errors.DataError` when a piece is missing
    or of the wrong size."""
    source = str(Path(out_dir) / WEIGHTS_FILE)
    for suffix in ("codes", "scale") + (("offset",) if entry.get("kind") == "minmax" else ()):
        if f"{key}.{suffix}" not in tensors:
            raise DataError(source, f"no tensor {key}.{suffix!r} (the manifest lists {key!r})")
    packed = tensors.pop(f"{key}.codes")
    count, shape = entry["count"], entry["shape"]
    if math.prod(shape) != count:
        raise DataError(str(Path(out_dir) / MANIFEST_FILE), f"{key!r}: shape {shape} has {math.prod(shape)} "
                        f"elements, count says {count}")
    need = math.ceil(count / 5) if entry["packing"] == "base3" else math.ceil(count * entry["bits"] / 8)
    if packed.dtype != torch.uint8 or packed.numel() != need:
        raise DataError(source, f"{key}.codes: {packed.numel()} {str(packed.dtype).removeprefix('torch.')} "
                        f"values, {need} uint8 bytes expected for {count} {entry['bits']}-bit codes")
    codes = unpack_base3(packed, count) if entry["packing"] == "base3" else unpack_bits(packed, entry["bits"], count)
    scale = tensors.pop(f"{key}.scale")
    offset = tensors.pop(f"{key}.offset", None)
    rows = shape[0] if entry.get("granularity") == "row" else 1
    for name, value in (("scale", scale), ("offset", offset)):
        if value is not None and value.numel() != rows:
            raise DataError(source, f"{key}.{name}: {value.numel()} values, expected {rows} "
                            f"({entry.get('granularity', 'layer')}-wise)")
    return codes.reshape(shape), scale, offset


def size_report(out_dir: Union[str, os.PathLike]) -> SizeReport:
    """Sizes of a packed export directory (see :class:`SizeReport`)."""
    out = Path(out_dir)
    manifest = read_manifest(out)
    packed = (out / manifest["weights_file"]).stat().st_size + (out / MANIFEST_FILE).stat().st_size
    ternary_code_bytes = sum(math.ceil(e["count"] / 5) if e["packing"] == "base3" else math.ceil(e["count"] * 2 / 8)
                             for e in manifest["quantized"].values() if e["kind"] == "ternary")
    floor = packed - ternary_code_bytes + math.ceil(manifest["ternary_weights"] * TERNARY_ENTROPY_BITS / 8)
    bits = manifest["bits"]
    return SizeReport(bits["weights"], bits["embedding"], bits["activations"], packed, manifest["fp32_bytes"],
                      floor, manifest["ternary_weights"])


def read_tensors(out_dir: Union[str, os.PathLike], manifest: dict) -> dict[str, torch.Tensor]:
    """The tensors of an export's weights file (a damaged file raises :class:`~ds_kdqat.errors.DataError`)."""
    path = Path(out_dir) / manifest["weights_file"]
    try:
        return safetensors.torch.load_file(str(path))
    except FileNotFoundError:
        raise DataError(str(path), "missing; the export's manifest names it") from None
    except Exception as err:  # safetensors raises its own error types for a bad header or truncated data
        raise DataError(str(path), f"not a readable safetensors file: {err}") from None


@torch.no_grad()
def load_packed(out_dir: Union[str, os.PathLike],
                model_or_factory: Union[nn.Module, Callable[[], nn.Module]], *, frozen: bool = True,
                integer: bool = False, verify: bool = True, integer_weights: str = "int8") -> nn.Module:
    """Rebuild the quantized model of an export.

    ``model_or_factory``: a full-precision model of the same architecture (or a callable returning one); it is
    quantized with the exported config (a model already quantized with the same config is used as is), then
    every weight is set from the file: quantized weights to their decoded values, the rest as stored.
    ``frozen`` (default): the weight quantizers use the decoded weights as they are, so the logits equal the
    exported student's bit for bit; ``frozen=False`` re-quantizes them each forward (for further training),
    which reproduces them only up to rounding. ``integer``: put integer-kernel modules
    (:mod:`ds_kdqat.deploy.int_modules`) in place of the quantized linears and embeddings that have an int8
    form, built from the codes without decoding them (the others are loaded frozen as usual); ``integer_weights``:
    how they hold the codes (:data:`ds_kdqat.deploy.int_modules.WEIGHT_MODES`: ``"int8"``, or ``"packed2"``,
    2-bit codes packed 4 per byte, each module packed as it is built, so the loader never holds every weight's
    int8 codes at once).

    The files the manifest lists are checked first (size, SHA-256; ``verify=False`` for a caller that just
    did); a missing, truncated or foreign tensor
    raises :class:`~ds_kdqat.errors.DataError` naming the file and the tensor.
    """
    out = Path(out_dir)
    manifest = read_manifest(out)
    if verify:
        verify_files(out, manifest)
    config = quant_config_from_dict(manifest["quant_config"])
    model = model_or_factory if isinstance(model_or_factory, nn.Module) else model_or_factory()
    current = model_quant_config(model)
    if current is None:
        quantize_model(model, config)
    elif current.to_dict() != config.to_dict():
        raise ValueError(f"the model is already quantized with a different config than {out / MANIFEST_FILE}")
    tensors = read_tensors(out, manifest)

    for key, entry in manifest["quantized"].items():
        module_name = key.removesuffix(".weight")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise ValueError(f"{out / MANIFEST_FILE}: {key!r} names no module of {type(model).__name__}") from None
        if not isinstance(module, QUANT_MODULE_TYPES) or list(module.weight.shape) != entry["shape"]:
            raise ValueError(f"{out / MANIFEST_FILE}: {key!r} is {entry['kind']} {entry['shape']}; the model's "
                             f"{module_name!r} is {type(module).__name__} {list(module.weight.shape)}")
        codes, scale, offset = unpacked_weight(out, key, entry, tensors)
        if integer:
            from ds_kdqat.deploy.int_modules import integer_module, replace_module

            new, _ = integer_module(module, entry["method"], entry["kind"], entry["bits"], codes, scale, offset,
                                    integer_weights)
            if new is not None:
                replace_module(model, module_name, new)
                continue
        value = QUANT_METHODS[entry["method"]].decode(entry["kind"], entry["bits"], codes, scale, offset)
        module.weight.copy_(value.to(module.weight.device, module.weight.dtype))
        module.weight_quant.frozen = frozen

    learned = _learned_activations(model)
    for name, entry in manifest.get("activations", {}).items():
        quantizer = learned.get(name)
        if quantizer is None or quantizer.method != entry["method"]:
            raise ValueError(f"{out / MANIFEST_FILE}: {name!r} is a learned {entry['method']} activation quantizer; "
                             f"the model has none there")
        absent = [f"{name}.{suffix}" for suffix in entry["tensors"] if f"{name}.{suffix}" not in tensors]
        if absent:
            raise DataError(str(out / manifest["weights_file"]), f"no tensor {absent[0]!r} (the manifest lists it)")
        stored = {suffix: tensors.pop(f"{name}.{suffix}") for suffix in entry["tensors"]}
        quantizer.quantizer.import_state(quantizer, stored)
    learned_keys = _state_keys_of(model, learned)

    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as err:  # a tensor of the wrong shape
        raise DataError(str(out / manifest["weights_file"]), f"does not fit {type(model).__name__}: "
                        + " ".join(str(err).split("\n")[1:3]).strip()) from None
    missing = [k for k in missing if k not in manifest["quantized"] and k not in learned_keys]
    if missing or unexpected:
        raise DataError(str(out / manifest["weights_file"]), f"does not fit {type(model).__name__}: "
                        f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model
