"""The one resolver of a `--device` option into a torch device (torch is imported only when it is called)."""

from ..errors import UserError


def resolve_device(device: str):
    """ "auto" -> cuda when present, else cpu; a CUDA request without CUDA is the user's to fix."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise UserError(f"--device {device}: {e}") from None
