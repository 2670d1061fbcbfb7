"""--batch-size auto (issue 18): 32 on a GPU; on a CPU, fewer images the larger they are (one at 448 px)."""

from types import SimpleNamespace

import pytest

from illust2vec.errors import UserError
from illust2vec.infer.backends import TorchBackend
from illust2vec.infer.engine import resolve_batch_size
from illust2vec.infer.pipeline import TagConfig


@pytest.mark.parametrize(
    ("device", "size", "requested", "expected"),
    [
        ("cpu", 448, "auto", 1),
        ("cpu", 256, "auto", 4),
        ("cpu", 128, "auto", 16),
        ("cpu", 64, "auto", 32),
        ("cuda:0", 448, "auto", 32),
        ("cpu", 448, 8, 8),
    ],
)
def test_auto_is_chosen_by_device_and_input_size(device, size, requested, expected):
    tagger = SimpleNamespace(backend=TorchBackend(module=None, device=device), image_size=size)
    assert resolve_batch_size(requested, tagger) == expected


def test_the_option_takes_auto_or_a_number(tmp_path):
    assert TagConfig(paths=(str(tmp_path),), model="m").batch_size == "auto"
    assert TagConfig(paths=(str(tmp_path),), model="m", batch_size="8").batch_size == 8
    for bad in ("big", 0, "0"):
        with pytest.raises(UserError, match="--batch-size must be auto or at least 1"):
            TagConfig(paths=(str(tmp_path),), model="m", batch_size=bad)


def test_serve_max_batch_auto_is_chosen_alike(synth_bundle):
    from illust2vec.serve.app import ServeConfig, load_state

    assert ServeConfig(model="m", max_batch="8").max_batch == 8
    with pytest.raises(UserError, match="--max-batch must be auto or at least 1"):
        ServeConfig(model="m", max_batch="many")
    state = load_state(ServeConfig(model=str(synth_bundle)))  # 96 px, onnxruntime on the CPU
    assert state.batcher.max_batch == resolve_batch_size("auto", state.tagger) == 16 * 128 * 128 // (96 * 96)
