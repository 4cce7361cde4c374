"""ONNX export of an adapted classifier: normalised images [N, 3, H, W] → logits [N, K], dynamic N.

The graph is the vision tower plus the cosine head (``AdaptedClassifier.forward``); preprocessing
(resize, centre crop, mean/std) is not in it, so the file's metadata carries what a runtime needs to
reproduce it: ``class_names``, ``image_size``, ``mean``, ``std``, ``interpolation`` (JSON strings).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch

from must_core.errors import MustError
from must_core.fsutil import atomic_write
from must_core.ml.inference import AdaptedClassifier

_logger = logging.getLogger(__name__)

OPSET = 18
INPUT_NAME, OUTPUT_NAME = "images", "logits"


class ExportError(MustError):
    """The model could not be exported (missing exporter packages or an unsupported graph)."""

    code = "export_failed"


def onnx_metadata(model: AdaptedClassifier) -> dict[str, str]:
    pp = model.preprocess
    return {
        "format": "must-onnx/1",
        "class_names": json.dumps(model.class_names),
        "image_size": str(pp.image_size),
        "mean": json.dumps(list(pp.mean)),
        "std": json.dumps(list(pp.std)),
        "interpolation": pp.interpolation,
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
    }


def export_onnx(model: AdaptedClassifier, path: Path) -> Path:
    """Write ``model`` as ONNX (fp32) to ``path`` atomically; returns the path (moves ``model`` to CPU).

    Raises:
        ExportError: when the ONNX packages are missing or the exporter rejects the graph.
    """
    try:
        import onnx
    except ImportError as exc:
        raise ExportError("ONNX export needs the onnx and onnxscript packages") from exc
    cpu = model.to("cpu").float().eval()
    size = cpu.preprocess.image_size
    example = torch.zeros(2, 3, size, size)

    def write(tmp: Path) -> None:
        try:
            # The fused attention fast path has no ONNX symbolic; the plain path computes the same.
            fastpath = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporter's progress chatter
                torch.onnx.export(
                    cpu,
                    (example,),
                    str(tmp),
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                    opset_version=OPSET,
                    dynamo=False,
                    external_data=False,
                )
        except Exception as exc:  # the exporter raises many unrelated types
            raise ExportError(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        proto = onnx.load(str(tmp))
        for key, value in onnx_metadata(cpu).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(tmp))

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
    _logger.info("exported ONNX model to %s", path)
    return path
