"""Backends run a model behind the WD interface: [N, H, W, 3] float32 BGR 0..255 -> (probabilities, features).

The torch backend runs `models.interface` modules; the ONNX backend runs the exported file with onnxruntime and
never imports torch, so a command that tags a folder with ONNX starts fast.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..util.device import resolve_device

log = logging.getLogger(__name__)


@dataclass
class OnnxBackend:
    """onnxruntime on the CPU, or on CUDA when onnxruntime-gpu is installed and asked for.

    `prob_outputs` are the outputs whose concatenation is one probability per tag (a WD file's first output; ours:
    "output" for rating, general and character, then one per other head), `feature_output` the feature vector's."""

    session: Any
    input_name: str
    prob_outputs: list[str]
    feature_output: str | None = None
    name: str = "onnx"
    fixed_batch: int | None = None  # a file exported with a fixed batch size (some older WD ones take 1 image)
    precision: str = "fp32"  # int8: the file is `i2v quantize`'s model.int8.onnx

    @property
    def has_features(self) -> bool:
        return self.feature_output is not None

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        n, step = len(batch), self.fixed_batch
        if step is None or n == step:
            return self._run(batch)
        parts = []
        for start in range(0, n, step):
            chunk = batch[start : start + step]
            if len(chunk) < step:  # the last one, padded to the file's batch size
                chunk = np.concatenate([chunk, np.zeros((step - len(chunk), *chunk.shape[1:]), np.float32)])
            parts.append(self._run(chunk))
        probs = np.concatenate([p for p, _ in parts])[:n]
        feats = np.concatenate([f for _, f in parts])[:n] if self.has_features else None
        return probs, feats

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        # Only the outputs used: a WD file may carry others (logits, embeddings) that cost nothing to skip.
        names = [*self.prob_outputs, *([self.feature_output] if self.feature_output else [])]
        outputs = self.session.run(names, {self.input_name: batch})
        k = len(self.prob_outputs)
        probs = np.concatenate([np.asarray(o, dtype=np.float32) for o in outputs[:k]], axis=1)
        return probs, (np.asarray(outputs[k], dtype=np.float32) if self.has_features else None)


CUDA_ONNX_HELP = (
    "install onnxruntime-gpu with the CUDA 12 and cuDNN 9 libraries (pip uninstall onnxruntime; "
    "pip install 'onnxruntime-gpu[cuda,cudnn]'), or run torch (--backend torch)"
)


def describe(backend: OnnxBackend | TorchBackend) -> str:
    """Where a backend runs and at what precision, for the summary line: "cpu (onnxruntime CPUExecutionProvider),
    int8", "cuda:0 (torch), bf16"."""
    if isinstance(backend, OnnxBackend):
        provider = backend.session.get_providers()[0]
        where = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
        return f"{where} (onnxruntime {provider}), {backend.precision}"
    return f"{backend.device} (torch), {'bf16' if backend.autocast is not None else 'fp32'}"


GRAPH_LEVELS = ("disable", "basic", "extended", "all")


@dataclass(frozen=True)
class SessionOptions:
    """onnxruntime's session options that `i2v tag` sets. The defaults are what measured best on a 2-core CPU
    (`python -m bench tag --session-options`, docs/benchmarks.md); the others stay for that bench to compare.

    Measured there (ConvNeXt-base, 448 px, batch 1, onnxruntime 1.32, load average 6 to 7 from other work): with
    onnxruntime's defaults as 1.00x, the forward pass alone (least time of 8, round robin) ran 1.26x with spinning
    off, 1.25x with one intra-op thread, 0.88x and 0.87x at graph levels extended and basic, 1.00x without the
    memory arena; `i2v tag` end to end 1.71x with spinning off. Spinning threads hold the cores between operators,
    which the decoding threads (and anything else on the machine) then wait for; without spinning both intra-op
    threads still work when there is work. So spinning is off; one thread would halve the forward pass on an idle
    machine, and the graph level and the arena stay onnxruntime's.
    """

    threads: int = 0  # intra-op threads; 0: onnxruntime's choice (one per physical core)
    graph: str = "all"  # graph optimisation level: disable, basic, extended, all
    arena: bool = True  # the CPU memory arena (reuses allocations between runs)
    spinning: bool = False  # intra-op threads spin while waiting for work (fast hand-offs, but they hold the cores)

    def __post_init__(self) -> None:
        if self.graph not in GRAPH_LEVELS:
            raise UserError(f"SessionOptions.graph must be one of {', '.join(GRAPH_LEVELS)}, not {self.graph!r}")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise UserError(f"SessionOptions.threads must be 0 (automatic) or more, not {self.threads!r}")

    def build(self, ort: Any) -> Any:
        """These options as onnxruntime's `SessionOptions`."""
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        level = ort.GraphOptimizationLevel
        options.graph_optimization_level = {
            "disable": level.ORT_DISABLE_ALL,
            "basic": level.ORT_ENABLE_BASIC,
            "extended": level.ORT_ENABLE_EXTENDED,
            "all": level.ORT_ENABLE_ALL,
        }[self.graph]
        options.enable_cpu_mem_arena = self.arena
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        options.log_severity_level = 3
        return options


def onnx_backend(
    path: Path,
    device: str = "cpu",
    threads: int = 0,
    outputs: tuple[list[str], str | None] | None = None,
    options: SessionOptions | None = None,
) -> OnnxBackend:
    """Open an ONNX tagger (ours, or a WD tagger's: same input, probabilities first).

    Args:
        outputs: the probability outputs and the feature output, as a bundle's config.json names them
            (`BundleInfo.onnx_outputs`); None: the first output holds every probability (a WD file), and an
            output named "features", if any, the feature vector.
        options: onnxruntime's session options; None: `SessionOptions()`, the defaults measured best.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("the ONNX backend needs onnxruntime: pip install 'illust2vec[infer]'") from None
    options = options or SessionOptions()
    if threads:
        options = replace(options, threads=threads)
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserError(f"--device {device} with the ONNX backend: {CUDA_ONNX_HELP}")
        index = device.partition(":")[2]
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(index)} if index.isdigit() else {}))
    try:
        session = ort.InferenceSession(str(path), options.build(ort), providers=providers)
    except Exception as e:  # onnxruntime raises its own types for a broken or foreign file
        raise UserError(f"{path}: cannot open the ONNX model ({e})") from None
    if device.startswith("cuda") and "CUDAExecutionProvider" not in session.get_providers():
        # onnxruntime-gpu falls back to the CPU, with a log line only, when CUDA's or cuDNN's libraries do not load.
        raise UserError(f"--device {device}: onnxruntime's CUDA execution provider did not load; {CUDA_ONNX_HELP}")
    inputs = session.get_inputs()
    shape = inputs[0].shape
    if len(shape) != 4 or shape[3] != 3:
        raise UserError(f"{path}: expected an NHWC input with 3 channels (the WD taggers'), found {shape}")
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    names = [o.name for o in session.get_outputs()]
    if outputs is None:
        # Ours name an output "features"; a WD file's extra outputs, if any, are not feature vectors.
        outputs = ([names[0]], "features" if "features" in names[1:] else None)
    missing = [n for n in [*outputs[0], outputs[1]] if n is not None and n not in names]
    if missing:
        raise UserError(f"{path}: the ONNX file has no output {', '.join(missing)} (it has {', '.join(names)})")
    return OnnxBackend(session, inputs[0].name, list(outputs[0]), outputs[1], fixed_batch=batch)


def onnx_input_size(backend: OnnxBackend) -> int | None:
    """The fixed height of an ONNX tagger's input (WD's are 448), or None when dynamic."""
    h = backend.session.get_inputs()[0].shape[1]
    return h if isinstance(h, int) else None


@dataclass
class TorchBackend:
    """A `models.interface` module on a device, with bf16 autocast on a GPU."""

    module: Any
    device: Any
    autocast: Any = None  # torch dtype for autocast, or None
    name: str = "torch"
    precision: str = "fp32"  # the weights' (a GPU computes in bf16 under autocast, as `describe` says)

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        with torch.inference_mode():
            if self.autocast is not None:
                with torch.autocast(self.device.type, dtype=self.autocast):
                    probs, features = self.module(x)
            else:
                probs, features = self.module(x)
        return probs.float().cpu().numpy(), features.float().cpu().numpy()


def torch_backend(module: Any, device: str = "auto", amp: bool = True) -> TorchBackend:
    """Put an interface module on a device in eval mode (channels-last and bf16 autocast on a GPU)."""
    import torch

    dev = resolve_device(device)
    module = module.eval().to(dev)
    autocast = None
    if dev.type == "cuda":
        module = module.to(memory_format=torch.channels_last)
        autocast = torch.bfloat16 if amp else None
        # cuDNN's autotuner (cudnn.benchmark) stays off, here and in training: on an H100 it gained nothing in
        # training (ConvNeXt-base 448 px: 321 vs 323 images/s), and it tunes again for every new batch size, which
        # `i2v serve`'s dynamic batches all are (batched serving fell from 31.9 to 10.5 requests/s).
    return TorchBackend(module, dev, autocast)
