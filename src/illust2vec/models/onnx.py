"""The tagger as an ONNX file in the WD taggers' convention, checked against torch with onnxruntime.

Export and convert both write model.onnx through `export_onnx`; `formats.bundle.save_bundle` decides where.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..formats.bundle import ONNX_INPUT
from .interface import WDInterface
from .tagger import TaggerNet

ONNX_OPSET = 18
MAX_DIFF = 1e-3  # the largest difference in probability from torch that an exported file may show


def export_onnx(model: TaggerNet, path: Path, opset: int = ONNX_OPSET) -> dict:
    """Write the WD-convention ONNX file and check it against torch with onnxruntime; returns its description.

    Input "input": [batch, size, size, 3] float32, BGR, 0..255 (dynamic batch). Outputs: "output", the probabilities
    in selected_tags.csv order (what WD tools read, as the first output), and "features", the feature vector.
    """
    size = model.cfg.image_size
    wrapped = WDInterface(model).eval()
    example = torch.rand(2, size, size, 3) * 255
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):  # their INFO lines are of no use to a user
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        program = torch.onnx.export(
            wrapped,
            (example,),
            dynamo=True,
            input_names=["input"],
            output_names=["output", "features"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            opset_version=opset,
            verbose=False,
        )
        program.save(str(path))
    except ImportError as e:
        raise UserError(f"--onnx needs onnx and onnxscript: pip install 'illust2vec[train]' ({e})") from None
    diff = onnx_parity(wrapped, path, size)
    if diff > MAX_DIFF:
        raise UserError(f"{path}: the ONNX model differs from torch by {diff:.2g} in probability; not exported")
    outputs = ["output", "features"]
    return {"file": path.name, "input": "input", "outputs": outputs, "opset": opset, **ONNX_INPUT, "max_abs_diff": diff}


def onnx_parity(wrapped: torch.nn.Module, path: Path, size: int, batch: int = 3) -> float:
    """The largest difference in probability between torch and onnxruntime on a random batch (of another size than
    the export's, which checks the dynamic batch dimension)."""
    import onnxruntime as ort

    x = (torch.rand(batch, size, size, 3, generator=torch.Generator().manual_seed(0)) * 255).numpy()
    with torch.no_grad():
        expected = wrapped(torch.from_numpy(x))[0].numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["output"], {"input": x})[0]
    return float(np.abs(got - expected).max())
