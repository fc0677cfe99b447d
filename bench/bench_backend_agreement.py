"""How closely the deployed backends reproduce trained students, on their own dev splits.

For each run folder given (a finished ``ds-kdqat train`` run: ``config.json`` + ``student/``), the student is
exported (:func:`ds_kdqat.deploy.artifact.export_student`, then :func:`~ds_kdqat.deploy.onnx_export.export_onnx`
when the ``[deploy]`` extra is installed) into a temporary folder, and every backend of
:func:`ds_kdqat.load_student` runs the run's dev split in the same batches (``--batch_size``, default the run's
micro-batch size: the 8-bit activation ranges are per batch, so batches must match). Printed per run and
backend: the primary metric, the share of examples whose predicted class equals the fake-quant student's, and
the deviation of the logits from the fake-quant ones relative to the largest fake-quant logit (median and
maximum over examples). The row ``fakequant ±1ulp`` is the fake-quant student itself with its embedding output
scaled by (1 + 2⁻²³), one unit in the last place: how far a change of float rounding alone moves this student,
the floor no other arithmetic (another BLAS, another backend) can go below.

Why a trained student: with per-batch min-max activation ranges, any change in the last bit of one value can
move a tensor's range and so many codes; a student fresh from quantization (no QAT) has logit margins smaller
than that noise, so its classes flip even between two float orders of the same fake-quant arithmetic. QAT
students have margins; the agreement measured here is what users get.

Usage: python bench/bench_backend_agreement.py RUN_DIR [RUN_DIR ...] [--batch_size N] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch


def dev_split(run_dir: Path, student: Path):
    """The run's task spec and its encoded dev split, read as the training job reads it."""
    from transformers import AutoConfig, AutoTokenizer

    from ds_kdqat.commands.export import read_run_config
    from ds_kdqat.data.description import task_spec
    from ds_kdqat.data.image_encode import ImageFormat
    from ds_kdqat.models.families import adapter_for_config
    from ds_kdqat.pipeline import load_datasets

    run = read_run_config(run_dir)
    spec = task_spec(run.kdqat.data)
    config = AutoConfig.from_pretrained(student, local_files_only=True)
    if adapter_for_config(config).input_kind == "pixels":
        tokenizer = ImageFormat.for_model(config, str(student), local_files_only=True)
    else:
        tokenizer = AutoTokenizer.from_pretrained(student, local_files_only=True)
    data = load_datasets(run, spec, tokenizer)
    name = next(iter(data.dev))
    return run, spec, data.dev[name]


def logits_of(model, dataset, batch_size: int) -> torch.Tensor:
    from ds_kdqat.engine import model_inputs

    out = []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = dataset.collate_fn([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            out.append(model(**model_inputs(batch)).logits.float())
    return torch.cat(out)


def one_ulp_off(model):
    """``model`` with its embedding output scaled by 1 + 2⁻²³ (a forward hook on its input embeddings' module)."""
    embeddings = model.base_model.embeddings
    embeddings.register_forward_hook(lambda module, inputs, output: output * (1 + 2 ** -23))
    return model


def check_run(run_dir: Path, batch_size: int, workdir: Path) -> list[tuple]:
    import ds_kdqat
    from ds_kdqat.data.metrics import compute_metrics
    from ds_kdqat.deploy.artifact import export_student, task_description
    from ds_kdqat.models.families import adapter_for
    from ds_kdqat.pipeline import load_student as load_saved_student

    student = run_dir / "student"
    run, spec, dev = dev_split(run_dir, student)
    model = load_saved_student(str(student), spec).eval()
    adapter = adapter_for(model)
    folder = workdir / run_dir.name
    export_student(model, folder, task=task_description(spec, run.kdqat.data.max_seq_length, adapter.input_kind,
                                                        adapter.token_type_ids), source_folder=student)
    backends = ["fakequant", "int8"]
    try:
        from ds_kdqat.deploy.onnx_export import export_onnx

        export_onnx(folder)
        backends.append("onnx")
    except (ImportError, ValueError) as err:
        print(f"{run_dir}: no ONNX backend ({err})", file=sys.stderr)
    size = batch_size or run.micro_batch_size
    labels = [dev[i]["labels"].item() for i in range(len(dev))]
    results = {b: logits_of(ds_kdqat.load_student(folder, b), dev, size) for b in backends}
    results["fakequant ±1ulp"] = logits_of(one_ulp_off(ds_kdqat.load_student(folder, "fakequant")), dev, size)
    reference = results["fakequant"]
    scale = reference.abs().max().item()
    rows = []
    for backend, logits in results.items():
        predictions = (logits.squeeze(-1) if spec.is_regression else logits.argmax(-1)).tolist()
        metric = compute_metrics(spec, predictions, labels)[spec.primary_metric]
        agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
        deviation = ((logits - reference).abs().amax(-1) / scale).tolist()
        rows.append((run_dir.name, model.kdqat_quant_config.preset, backend, spec.primary_metric, metric, agree,
                     statistics.median(deviation), max(deviation), len(dev), size))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--batch_size", type=int, default=0, help="0: the run's micro-batch size")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| run | preset | backend | metric | value | same class as fake-quant | median rel. Δlogit | "
          "max rel. Δlogit | examples | batch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for run_dir in args.runs:
            for row in check_run(run_dir, args.batch_size, Path(tmp)):
                name, preset, backend, metric, value, agree, median, worst, n, size = row
                print(f"| {name} | {preset} | {backend} | {metric} | {value:.4f} | {agree:.2%} | {median:.1e} | "
                      f"{worst:.1e} | {n} | {size} |", flush=True)


if __name__ == "__main__":
    main()
