"""The tagger as an ONNX file in the WD taggers' convention, checked against torch with onnxruntime.

Export and convert both write model.onnx through `export_onnx`; `formats.bundle.save_bundle` decides where.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..formats.bundle import FEATURES_OUTPUT, ONNX_INPUT, WD_OUTPUT
from .interface import WDOutputs
from .tagger import TaggerNet

ONNX_OPSET = 18
MAX_DIFF = 1e-3  # the largest difference in probability from torch that an exported file may show


def export_onnx(model: TaggerNet, path: Path, opset: int = ONNX_OPSET, input_size: int | None = None) -> dict:
    """Write the WD-convention ONNX file and check it against torch with onnxruntime; returns its description.

    Input "input": [batch, size, size, 3] float32, BGR, 0..255 (dynamic batch). Outputs: "output", the probabilities
    of the rating, general and character tags in selected_tags.csv order (what WD tools read, as the first output);
    one output per other head, named after it ("copyright", "artist"), in extra_tags.csv order; and "features", the
    feature vector. `input_size`: take images of that size and resize them to the model's inside the graph.
    """
    wrapped = WDOutputs(model, input_size).eval()
    if not wrapped.wd:
        raise UserError(
            "the ONNX file's first output holds the rating, general and character heads; the model has none"
        )
    size = wrapped.input_size
    example = torch.rand(2, size, size, 3) * 255
    names = [WD_OUTPUT, *wrapped.extra, FEATURES_OUTPUT]
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):  # their INFO lines are of no use to a user
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        program = torch.onnx.export(
            wrapped,
            (example,),
            dynamo=True,
            input_names=["input"],
            output_names=names,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            opset_version=opset,
            verbose=False,
        )
        program.save(str(path))
    except ImportError as e:
        raise UserError(f"--onnx needs onnx and onnxscript: pip install 'illust2vec[train]' ({e})") from None
    diff = onnx_parity(wrapped, path, size, len(names) - 1)
    if diff > MAX_DIFF:
        raise UserError(f"{path}: the ONNX model differs from torch by {diff:.2g} in probability; not exported")
    described = {"file": path.name, "input": "input", "outputs": names, "opset": opset, **ONNX_INPUT}
    return {**described, "input_size": size, "max_abs_diff": diff}


def onnx_parity(wrapped: torch.nn.Module, path: Path, size: int, probs: int = 1, batch: int = 3) -> float:
    """The largest difference in probability between torch and onnxruntime over the first `probs` outputs, on a
    random batch (of another size than the export's, which checks the dynamic batch dimension)."""
    import onnxruntime as ort

    x = (torch.rand(batch, size, size, 3, generator=torch.Generator().manual_seed(0)) * 255).numpy()
    with torch.no_grad():
        expected = [t.numpy() for t in wrapped(torch.from_numpy(x))[:probs]]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([o.name for o in session.get_outputs()[:probs]], {"input": x})
    return max(float(np.abs(g - e).max()) for g, e in zip(got, expected, strict=True))
