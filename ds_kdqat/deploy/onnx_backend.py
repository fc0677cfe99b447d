"""The ``"onnx"`` backend of :func:`ds_kdqat.load_student`: the export's ``model.onnx`` in ONNX Runtime.

:func:`load_onnx_student` returns an :class:`OnnxStudent`, an ``nn.Module`` that the project's evaluation and
prediction code calls like the PyTorch model: ``model(input_ids=…, attention_mask=…, token_type_ids=…)`` or
``model(pixel_values=…)`` with torch tensors → a ``SequenceClassifierOutput`` (``logits``) or a
``QuestionAnsweringModelOutput`` (``start_logits``, ``end_logits``) of torch float32 tensors on the CPU.
The graph is written by :func:`ds_kdqat.deploy.onnx_export.export_onnx` (``ds-kdqat export --onnx``).

ONNX Runtime is the optional ``[deploy]`` extra (``pip install 'ds-kdqat[deploy]'``); training never imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ds_kdqat.errors import DataError

ONNX_FILE = "model.onnx"
INSTALL_HINT = "pip install 'ds-kdqat[deploy]'"


class DeployExtraMissing(ImportError):
    """A package of the ``[deploy]`` extra (onnxruntime, onnx) is not installed."""


def import_deploy_package(name: str, purpose: str) -> Any:
    """The module ``name`` (``"onnxruntime"``, ``"onnx"``); :class:`DeployExtraMissing` (an ImportError)
    saying what needs it and how to install it when it is not installed."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise DeployExtraMissing(f"{purpose} needs {name}, which is not installed ({err}); install the deploy "
                                 f"extra: {INSTALL_HINT}") from None


def session_options(ort: Any, threads: Optional[int] = None) -> Any:
    """CPU session options: ``threads`` intra-op threads (default ``torch.get_num_threads()``), one inter-op
    thread (the graph is a chain), every graph optimisation ONNX Runtime has."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def _onnx_entry(folder: Path, manifest: dict) -> dict:
    """The manifest's ``onnx`` entry, its file present and listed in ``files`` (so load_student checked it)."""
    entry = manifest.get("onnx")
    name = entry.get("file", ONNX_FILE) if isinstance(entry, dict) else ONNX_FILE
    path = folder / name
    hint = "run `ds-kdqat export --onnx` on the export to write it"
    if not path.is_file():
        raise DataError(str(path), f"missing: this export has no ONNX graph; {hint}")
    if not isinstance(entry, dict) or name not in manifest.get("files", {}):
        raise DataError(str(folder / "manifest.json"), f"{name} is not recorded in the manifest (not written "
                        f"by ds-kdqat's ONNX export, or the manifest was replaced); {hint}")
    for key in ("inputs", "outputs"):
        if not isinstance(entry.get(key), list) or not entry[key]:
            raise DataError(str(folder / "manifest.json"), f"onnx.{key}: expected a non-empty list of names")
    return entry


class OnnxStudent(nn.Module):
    """An ONNX Runtime session as a model: keyword tensors in, a transformers ``ModelOutput`` out.

    ``forward(**inputs)``: the graph's inputs (``input_ids``/``attention_mask``/``token_type_ids`` (B, S)
    int64, or ``pixel_values`` (B, C, H, W) float32) taken by name; other keyword arguments (``labels``,
    ``return_dict``, inputs the graph lacks) are ignored; a missing ``attention_mask`` is all ones and a
    missing ``token_type_ids`` all zeros, as in the HF forward. Returns ``SequenceClassifierOutput(logits)``
    or, when the graph's outputs are ``start_logits``/``end_logits``, ``QuestionAnsweringModelOutput``.
    ``config``: the export's HF config (labels, image size, …).
    """

    def __init__(self, session: Any, inputs: list[str], outputs: list[str], config: Any = None,
                 path: Optional[Path] = None):
        super().__init__()
        self.session, self.input_names, self.output_names = session, list(inputs), list(outputs)
        self.config, self.path = config, path
        graph_inputs = {i.name for i in session.get_inputs()}
        if set(self.input_names) != graph_inputs:
            raise DataError(str(path), f"the graph's inputs are {sorted(graph_inputs)}; the manifest says "
                            f"{self.input_names}")

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def _feed(self, given: dict[str, Any]) -> dict[str, Any]:
        """Numpy arrays for the graph's inputs (int64 ids and masks, float32 pixels)."""
        feed = {}
        for name in self.input_names:
            value = given.get(name)
            if value is None:
                value = self._default(name, given)
            value = torch.as_tensor(value).detach().cpu()
            value = value.float() if name == "pixel_values" else value.long()
            feed[name] = value.contiguous().numpy()
        return feed

    def _default(self, name: str, given: dict[str, Any]) -> torch.Tensor:
        ids = given.get("input_ids")
        if name in ("attention_mask", "token_type_ids") and ids is not None:
            filler = torch.ones_like if name == "attention_mask" else torch.zeros_like
            return filler(torch.as_tensor(ids), dtype=torch.long)
        raise ValueError(f"{self.path}: the ONNX graph needs the input {name!r}; got {sorted(given)}")

    def forward(self, **inputs: Any) -> Any:
        from transformers.modeling_outputs import QuestionAnsweringModelOutput, SequenceClassifierOutput

        results = self.session.run(self.output_names, self._feed(inputs))
        tensors = {name: torch.from_numpy(value) for name, value in zip(self.output_names, results)}
        if "start_logits" in tensors:
            return QuestionAnsweringModelOutput(start_logits=tensors["start_logits"], end_logits=tensors["end_logits"])
        return SequenceClassifierOutput(logits=tensors["logits"])

    def extra_repr(self) -> str:
        return f"{self.path}, inputs={self.input_names}, outputs={self.output_names}, onnxruntime CPU"


def _config(folder: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise DataError(str(folder / "config.json"), f"not a readable model config: {err}") from None


def load_onnx_student(folder: Path, manifest: dict, threads: Optional[int] = None) -> OnnxStudent:
    """The export's ONNX graph in an ONNX Runtime CPU session (``threads`` intra-op threads, default
    ``torch.get_num_threads()``), wrapped as an :class:`OnnxStudent` in eval mode.

    ``manifest``: the export's (already verified by :func:`ds_kdqat.load_student`: the file's checksum is in
    its ``files``). Raises :class:`~ds_kdqat.errors.DataError` when the export has no ONNX graph (run
    ``ds-kdqat export --onnx``) and :class:`DeployExtraMissing` when onnxruntime is not installed.
    """
    folder = Path(folder)
    entry = _onnx_entry(folder, manifest)
    ort = import_deploy_package("onnxruntime", "the 'onnx' backend")
    path = folder / entry.get("file", ONNX_FILE)
    try:
        session = ort.InferenceSession(str(path), sess_options=session_options(ort, threads),
                                       providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types (Fail, InvalidGraph, …)
        raise DataError(str(path), f"ONNX Runtime cannot load the graph: {err}") from None
    return OnnxStudent(session, entry["inputs"], entry["outputs"], _config(folder), path).eval()
