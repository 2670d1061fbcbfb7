"""--keep-old: learning without forgetting keeps the original model's outputs for its own tags while a new tag is
learnt; tags the new data never labels take the original's outputs as targets, or no target at all without it."""

import copy

import numpy as np
import pytest
import torch

from illust2vec.evaluation.metrics import mean_average_precision
from illust2vec.evaluation.vocab_map import VocabMap
from illust2vec.formats.bundle import Thresholds
from illust2vec.formats.vocab import Vocab, tag_id
from illust2vec.models import create_tagger, default_heads
from illust2vec.train.extend import Extension
from illust2vec.train.init import InitModel, extend_model, merge_vocab
from illust2vec.train.losses import LossConfig, bce_loss, keep_old_loss, multitask_loss


def general(names):
    return Vocab(tuple(tag_id(n) for n in names), tuple(names), (0,) * len(names), (1,) * len(names))


OLD, DATA = general([f"old{i}" for i in range(6)]), general(["square"])


def extension(keep_old: float) -> tuple[torch.nn.Module, torch.nn.Module, Extension]:
    torch.manual_seed(0)
    old = create_tagger("test_resnet", heads=default_heads({"general": 6}), image_size=32).eval()
    with torch.no_grad():
        old.heads["general"].fc.weight.mul_(5)  # confident, varied outputs: something to forget
    merged = merge_vocab(OLD, DATA, "union")
    init = InitModel(old, OLD, Thresholds(), {"model": "old"})
    model = extend_model(init, merged, DATA, {"general": [40]}, 128, {})
    acts = {"general": "sigmoid"}
    data, olds = VocabMap.between(merged, DATA), VocabMap.between(merged, OLD)
    original = old if keep_old > 0 else None
    return old, model, Extension(merged, data, olds, acts, keep_old, original, None, None, init, {})


def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise, half of it with a white square in a corner: the new tag."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 200, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    label = torch.arange(n) % 2
    x[label == 1, :, 2:12, 2:12] = 255
    return x, label.float()[:, None]


def step(model, ext: Extension, opt, batch: torch.Tensor, targets: dict, original: dict | None) -> dict:
    """One training step as the loop takes it: the loss, the keep-old term, the optimizer's step; the loss parts."""
    logits = model(batch)
    loss, parts = multitask_loss(logits, targets, ext.activations, LossConfig())
    loss, parts = ext.keep(logits, original, targets, loss, parts)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return parts


def train(keep_old: float, steps: int = 40) -> dict:
    old, model, ext = extension(keep_old)
    x, y = images(128, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for n in range(steps):
        i = torch.arange(16) + 16 * (n % 8)
        parts = step(model, ext, opt, *ext.batch(x[i], {"general": y[i]}))
    model.eval()
    test, truth = images(64, 1)
    with torch.no_grad():
        ours, theirs = torch.sigmoid(model(test)["general"]), torch.sigmoid(old(test)["general"])
    drift = float((ours[:, :6] - theirs).abs().mean())
    return {"drift": drift, "new_ap": mean_average_precision(ours[:, 6:].numpy(), truth.numpy()), "parts": parts}


def test_keep_old_keeps_the_old_outputs_while_the_new_tag_is_learnt():
    kept, free = train(1.0), train(0.0)
    assert kept["new_ap"] > 0.9 and free["new_ap"] > 0.9  # the square is learnt either way
    assert "keep_old" in kept["parts"] and "keep_old" not in free["parts"]
    assert kept["drift"] < 0.5 * free["drift"], (kept["drift"], free["drift"])
    assert kept["drift"] < 0.1


def test_tags_the_data_lacks_take_the_original_s_outputs_or_no_target():
    old, _, ext = extension(1.0)
    x, y = images(4, 2)
    _, targets, original = ext.batch(x, {"general": y})
    with torch.no_grad():
        want = torch.sigmoid(old(x)["general"])
    assert torch.allclose(targets["general"][:, :6], want) and torch.equal(targets["general"][:, 6:], y)
    assert torch.allclose(original["general"], torch.logit(want), atol=1e-4)
    _, _, free = extension(0.0)
    _, targets, original = free.batch(x, {"general": y})
    assert original is None and targets["general"][:, :6].isnan().all() and torch.equal(targets["general"][:, 6:], y)


def test_a_nan_target_is_no_label():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]], requires_grad=True)
    targets = torch.tensor([[1.0, float("nan"), 0.0], [float("nan"), 1.0, 0.0]])
    known = ~targets.isnan()
    loss = bce_loss(logits, targets)
    want = torch.nn.functional.binary_cross_entropy_with_logits(logits[known], targets[known])
    assert loss.item() == pytest.approx(want.item())
    loss.backward()
    assert logits.grad[0, 1] == 0 and logits.grad[1, 0] == 0 and logits.grad[0, 0] != 0


def test_keep_old_loss_is_smallest_at_the_original_outputs():
    original = {"general": torch.tensor([[2.0, -1.0, 0.0]]), "rating": torch.tensor([[1.0, 0.0, -1.0, 0.0]])}
    columns = {"general": (torch.tensor([0, 2]), torch.tensor([0, 1])), "rating": (torch.arange(4), torch.arange(4))}
    acts = {"general": "sigmoid", "rating": "softmax"}

    def at(general):
        return keep_old_loss({"general": general, "rating": original["rating"]}, original, columns, acts).item()

    same = torch.tensor([[2.0, 9.0, -1.0]])  # the model's columns 0 and 2 are the original's 0 and 1
    losses = [at(same + torch.tensor([[d, 0.0, -d]])) for d in np.linspace(-2, 2, 9)]
    assert int(np.argmin(losses)) == 4 and losses[0] > losses[4] + 0.1


def test_the_original_s_rows_learn_at_the_backbone_s_rate_and_new_rows_at_the_heads():
    _, model, ext = extension(1.0)
    x, y = images(16, 3)
    batch, targets, original = ext.batch(x, {"general": y})
    moved = {}
    for scale in (1.0, 0.1):
        net = copy.deepcopy(model).train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.05)
        ext.scale_old_rows(net, opt, scale)
        step(net, ext, opt, batch, targets, original)
        moved[scale] = {k: (v - model.state_dict()[k]).detach() for k, v in net.state_dict().items()}
    full, scaled = moved[1.0], moved[0.1]
    for key in ("heads.general.fc.weight", "heads.general.fc.bias"):
        assert full[key][:6].abs().max() > 1e-3  # the old rows (the original's 6 tags) did move
        assert torch.allclose(scaled[key][:6], 0.1 * full[key][:6], atol=1e-6, rtol=1e-4)
        assert torch.allclose(scaled[key][6:], full[key][6:])  # the new tag's row: the whole step
    conv = next(k for k in full if k.startswith("backbone.") and k.endswith("weight"))
    assert torch.allclose(scaled[conv], full[conv])  # the backbone: its own optimizer group, untouched here


def characters(names):
    return Vocab(tuple(tag_id(n) for n in names), tuple(names), (4,) * len(names), (1,) * len(names))


def character_extension(data: Vocab) -> tuple[torch.nn.Module, Extension]:
    """An original that knows characters a, b, c; DATA of another vocabulary; the merged model (union)."""
    torch.manual_seed(0)
    old_vocab = characters(["a", "b", "c"])
    old = create_tagger("test_resnet", heads=default_heads({"character": 3}), image_size=32).eval()
    merged = merge_vocab(old_vocab, data, "union")
    init = InitModel(old, old_vocab, Thresholds(), {"model": "old"})
    model = extend_model(init, merged, data, {"character": [5] * len(data.names)}, 20, {})
    maps = VocabMap.between(merged, data), VocabMap.between(merged, old_vocab)
    return model, Extension(merged, *maps, {"character": "sigmoid"}, 1.0, old, None, None, init, {})


def test_on_a_post_of_a_new_character_the_old_characters_data_labels_take_its_label_alone():
    """DATA built from the new crawl and a sample of the old board labels old character b as well as the new one:
    where a post carries the new character, b's keep-old term is left out (DATA says b is absent), while a and c,
    which DATA never labels, keep theirs; on a post of the old board every term counts."""
    model, ext = character_extension(characters(["b", "new"]))  # merged: a, b, c, new
    x = torch.randint(0, 255, (3, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])  # a new character's post, b's post, neither
    batch, targets, original = ext.batch(x, {"character": labels})
    logits = model(batch)
    columns = {"character": tuple(torch.as_tensor(c) for c in ext.old.columns("character"))}
    masks = ext.rival_masks(columns, targets)
    assert masks["character"].tolist() == [[True, False, True], [True, True, True], [True, True, True]]
    loss, parts = ext.keep(logits, original, targets, torch.zeros(()), {})
    loss.backward()
    head = model.heads["character"].fc.weight.grad  # rows a, b, c, new
    assert parts["keep_old"] > 0 and head[:3].abs().sum() > 0
    # b's keep-old term only ever sees posts 2 and 3: leaving post 1 out changes its gradient, not a's
    model.zero_grad()
    alone = keep_old_loss(model(batch), original, columns, ext.activations)
    alone.backward()
    full = model.heads["character"].fc.weight.grad
    assert not torch.allclose(full[1], head[1]) and torch.allclose(full[0], head[0], atol=1e-6)


def test_with_new_characters_alone_every_keep_old_term_counts():
    """DATA of the new characters alone labels no old one: the original's outputs stay the old characters' targets on
    every post, the new characters' included (leaving them out there forgets the old characters)."""
    _, ext = character_extension(characters(["new"]))
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    _, targets, _ = ext.batch(x, {"character": torch.tensor([[1.0], [0.0]])})
    columns = {"character": tuple(torch.as_tensor(c) for c in ext.old.columns("character"))}
    assert ext.rival_masks(columns, targets) == {}
