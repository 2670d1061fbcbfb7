"""One writer of the ONNX files tests build by hand in a WD tagger's layout: NHWC float pixels in, probabilities out,
the batch dimension free (the TorchScript exporter, deprecated but the one that needs no onnxscript; WD's own files
came from tf2onnx)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch


def export_nhwc(
    module: torch.nn.Module, size: int, path: Path, names: tuple[str, str] = ("input_1", "predictions_sigmoid")
):
    """Write `module` (NHWC pixels 0-255 -> probabilities) to `path` as ONNX, input and output named `names`."""
    source, sink = names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (torch.rand(2, size, size, 3) * 255,),
            str(path),
            dynamo=False,
            input_names=[source],
            output_names=[sink],
            dynamic_axes={source: {0: "batch"}, sink: {0: "batch"}},
            opset_version=17,
        )
