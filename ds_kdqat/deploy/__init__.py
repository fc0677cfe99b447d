"""Deploying the student: the self-contained export (:mod:`.artifact`), loading it with one of several
backends (:mod:`.load`), integer-kernel modules (:mod:`.int_modules`, :mod:`.int_ops`), ONNX export and
ONNX Runtime (:mod:`.onnx_export`, :mod:`.onnx_backend`) and batched prediction (:mod:`.predict`)."""
