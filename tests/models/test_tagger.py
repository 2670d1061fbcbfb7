"""The tagger factory and model: the seed's exact shape, every preset's forward and backward, configs and freezing."""

import json

import pytest
import timm
import torch
import torch.nn.functional as F

from illust2vec.errors import UserError
from illust2vec.models import (
    I2VVGG16,
    PRESETS,
    HeadConfig,
    TaggerConfig,
    TaggerNet,
    create_tagger,
    default_heads,
    load_tagger,
)
from illust2vec.models.seed import BN_EPS, BN_MOMENTUM, load_imagenet_vgg16

# Each preset's code path with a backbone small enough for a CPU test; the seed has no smaller form, so it runs whole.
TINY = {
    "i2v_vgg16": dict(),
    "i2v_small": dict(image_size=64),
    "i2v_convnext_base": dict(backbone="test_convnext", image_size=64),
    "i2v_vit_base": dict(backbone="test_vit", image_size=64),
}
SIZES = {"rating": 4, "general": 60, "character": 20, "copyright": 8}


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def head_loss(model: TaggerNet, logits: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each head's own loss on random targets, summed: cross-entropy for softmax heads, BCE for sigmoid ones."""
    g = torch.Generator().manual_seed(1)
    loss = torch.zeros(())
    for h in model.cfg.heads:
        out = logits[h.name]
        if h.activation == "softmax":
            loss = loss + F.cross_entropy(out, torch.randint(0, h.classes, out.shape[:1], generator=g))
        else:
            loss = loss + F.binary_cross_entropy_with_logits(out, torch.rand(out.shape, generator=g).round())
    return loss


def count(model: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def test_seed_is_the_design_documents_model():
    model = create_tagger("i2v_vgg16").eval()
    assert count(model) == 18_652_480
    assert count(model, trainable=True) == 15_736_832
    names = dict(model.backbone.named_modules())
    assert [f"block{b}_conv{c}" for b, n in enumerate((2, 2, 3, 3, 3), 1) for c in range(1, n + 1)] == [
        n for n in names if n.startswith("block") and "conv" in n
    ]
    for bn in (model.backbone.low_features.bn, model.backbone.high_features.bn):
        assert (bn.eps, bn.momentum) == (BN_EPS, BN_MOMENTUM) == (1e-3, 0.01)
    assert [h.name for h in model.cfg.heads] == ["general", "character", "copyright"]
    with torch.no_grad():
        x = images(2, 256)
        features = model.forward_features(x)
        assert [tuple(f.shape) for f in features] == [(2, 512, 8, 8), (2, 512, 6, 6)]
        logits = model.forward_head(features)
        assert {k: tuple(v.shape) for k, v in logits.items()} == {
            k: (2, 512) for k in ("general", "character", "copyright")
        }
        assert model.extract_feature(x).shape == (2, 512) == (2, model.num_features)
        probs = model.activate(logits)
        # The general ("attribute") head reads the low features; the others read the high ones, as the feature does.
        torch.testing.assert_close(logits["general"], model.heads["general"](model.backbone.pool_low(features)))
        torch.testing.assert_close(logits["character"], model.heads["character"](features[1].mean((2, 3))))
    for name in ("character", "copyright"):
        torch.testing.assert_close(probs[name].sum(-1), torch.ones(2))
    assert (probs["general"] > 0).all() and (probs["general"] < 1).all()
    torch.testing.assert_close(probs["general"], logits["general"].sigmoid())


def test_seed_with_a_rating_head():
    model = create_tagger("i2v_vgg16", heads=default_heads(SIZES, softmax=("character", "copyright")))
    assert [h.name for h in model.cfg.heads] == ["rating", "general", "character", "copyright"]
    assert model.heads["rating"].fc2.out_features == 4
    assert model.heads["general"].fc2.out_features == 60


def test_every_preset_has_a_tiny_form():
    assert set(TINY) == set(PRESETS)


@pytest.mark.parametrize("preset", list(TINY))
def test_preset_forward_backward(preset):
    torch.manual_seed(0)
    model = create_tagger(preset, **TINY[preset]).train()
    size = model.cfg.image_size
    batch = 1 if preset == "i2v_vgg16" else 2  # the seed runs at its full 256 px
    logits = model(images(batch, size))
    assert list(logits) == [h.name for h in model.cfg.heads]
    for h in model.cfg.heads:
        assert logits[h.name].shape == (batch, h.classes)
        assert torch.isfinite(logits[h.name]).all()
    head_loss(model, logits).backward()
    frozen = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        else:
            frozen += 1
            assert p.grad is None, f"frozen {name} got a gradient"
    assert (frozen > 0) == (model.cfg.freeze is not None)
    model.eval()
    with torch.no_grad():
        assert model.extract_feature(images(batch, size)).shape == (batch, model.num_features)


def test_full_presets_are_what_they_claim():
    # Built on the meta device: shapes and counts without allocating or initialising ~90M parameters each.
    with torch.device("meta"):
        convnext = create_tagger("i2v_convnext_base")
        vit = create_tagger("i2v_vit_base")
        small = create_tagger("i2v_small")
    heads = [("rating", 4, "softmax")] + [(n, 512, "sigmoid") for n in ("general", "character", "copyright")]
    for model in (convnext, vit, small):
        assert [(h.name, h.classes, h.activation) for h in model.cfg.heads] == heads
    assert (convnext.cfg.backbone, convnext.cfg.image_size, convnext.num_features) == ("convnext_base", 448, 1024)
    assert count(convnext.backbone) == 87_566_464  # timm's convnext_base without its classifier
    assert (vit.cfg.backbone, vit.cfg.image_size, vit.num_features) == ("vit_base_patch16_224", 448, 768)
    assert vit.backbone.pos_embed.shape == (1, (448 // 16) ** 2 + 1, 768)  # sized for 448 px, not 224
    assert vit.backbone.patch_embed.img_size == (448, 448)
    assert small.cfg.image_size == 128


def test_a_timm_name_is_a_backbone_with_default_heads():
    model = create_tagger("test_resnet")
    pretrained_cfg = timm.models.get_pretrained_cfg("test_resnet")
    assert (model.cfg.name, model.cfg.backbone) == ("test_resnet", "test_resnet")
    assert model.cfg.image_size == pretrained_cfg.input_size[-1]
    assert (model.cfg.mean, model.cfg.std) == (pretrained_cfg.mean, pretrained_cfg.std)
    assert [h.name for h in model.cfg.heads] == ["rating", "general", "character", "copyright"]
    assert model.heads["general"].fc.in_features == model.num_features == model.backbone.num_features


def test_overrides_replace_fields():
    heads = default_heads(SIZES)
    model = create_tagger("test_efficientnet", heads=heads, image_size=96, head_hidden=32, drop_rate=0.1).eval()
    assert model.cfg.heads == heads and model.cfg.image_size == 96
    with torch.no_grad():
        logits = model(images(2, 96))
    assert {k: v.shape[1] for k, v in logits.items()} == SIZES
    assert model.heads["general"].fc1.out_features == 32
    # A fixed-size backbone is built for the configured size.
    vit = create_tagger("test_vit", image_size=64)
    assert vit.backbone.patch_embed.img_size == (64, 64)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: create_tagger("no_such_model"), "unknown model 'no_such_model': neither a preset"),
        (lambda: create_tagger("test_resnet", colour="red"), r"unknown tagger config fields \['colour'\]"),
        (lambda: create_tagger("test_resnet", freeze="layer9"), "test_resnet has no module 'layer9'"),
        (lambda: create_tagger("test_resnet", heads=()), "at least one head"),
        (lambda: create_tagger("i2v_vgg16", image_size=64), "at least 96 px"),
        (
            lambda: TaggerNet(TaggerConfig("x", "no_such_net", 64, default_heads(SIZES))),
            "unknown backbone 'no_such_net'",
        ),
        (lambda: default_heads({"colour": 3}), r"unknown heads \['colour'\]"),
        (lambda: HeadConfig("general", 3, "relu"), "neither sigmoid nor softmax"),
        (lambda: HeadConfig("general", 0, "sigmoid"), "positive integer"),
        (lambda: TaggerConfig("x", "test_resnet", 64, tuple(reversed(default_heads(SIZES)))), "vocabulary's order"),
        (lambda: TaggerConfig.from_dict({"name": "x", "colour": 1}), r"unknown tagger config fields \['colour'\]"),
        (lambda: TaggerConfig.from_dict({"name": "x", "backbone": "test_resnet"}), "incomplete tagger config"),
        (lambda: TaggerConfig("x", "test_resnet", "64", default_heads(SIZES)), "image_size must be a number, not '64'"),
        (lambda: TaggerConfig("x", "test_resnet", 64, ({"name": "general"},)), "heads, mean or std malformed"),
        (lambda: TaggerConfig("x", "test_resnet", 64, default_heads(SIZES), mean=("a", 0, 0)), "malformed"),
        (lambda: create_tagger("i2v_vgg16", head_hidden=0), "head_hidden must be > 0"),
    ],
)
def test_mistakes_are_user_errors(call, message):
    """A bad config is the user's to fix: one UserError naming the field, never a ValueError or TypeError."""
    with pytest.raises(UserError, match=message):
        call()


def test_load_tagger_gives_the_saved_model_back(tmp_path):
    from safetensors.torch import save_file

    model = create_tagger("test_resnet", heads=default_heads(SIZES), image_size=64).eval()
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    config = json.loads(json.dumps(model.cfg.to_dict()))  # as a run's or a bundle's config.json holds it
    loaded = load_tagger(config, tmp_path / "model.safetensors")
    assert loaded.cfg == model.cfg and not loaded.training
    x = images(2, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x).values(), loaded(x).values(), strict=True))
    fewer = create_tagger("test_resnet", heads=default_heads({h: SIZES[h] for h in ("rating", "general")}))
    with pytest.raises(UserError, match="weights do not fit the model"):
        load_tagger(fewer.cfg.to_dict(), tmp_path / "model.safetensors")


def test_default_heads():
    heads = default_heads({"copyright": 8, "general": 60, "rating": 4, "character": 20}, softmax=["character"])
    assert heads == (
        HeadConfig("rating", 4, "softmax"),
        HeadConfig("general", 60, "sigmoid"),
        HeadConfig("character", 20, "softmax"),
        HeadConfig("copyright", 8, "sigmoid"),
    )


def test_freeze_stops_at_the_named_module():
    model = create_tagger("test_resnet", freeze="backbone.layer1")
    trainable = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone.")}
    frozen = {n.split(".")[1] for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "bn1", "layer1"}
    assert trainable == {"layer2", "layer3", "layer4"}
    assert all(p.requires_grad for p in model.heads.parameters())
    model.train()  # frozen BatchNorms keep their running statistics
    assert not model.backbone.bn1.training and not model.backbone.layer1[0].bn1.training
    assert model.backbone.layer2[0].bn1.training
    assert model.trainable_parameters() == [p for p in model.parameters() if p.requires_grad]
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model).train()  # what DDP training does
    assert not synced.backbone.bn1.training and synced.backbone.layer2[0].bn1.training


def test_config_round_trips_through_json():
    cfg = create_tagger("i2v_convnext_base", backbone="test_convnext", image_size=64, freeze="stem").cfg
    again = TaggerConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert isinstance(again.heads[0], HeadConfig) and isinstance(again.mean, tuple)


def test_same_seed_same_model():
    cfg = create_tagger("i2v_vit_base", backbone="test_vit", image_size=64).cfg
    x = images(2, 64)
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = create_tagger(cfg).eval()
        with torch.no_grad():
            outs.append(model(x))
    for name in outs[0]:
        torch.testing.assert_close(outs[0][name], outs[1][name], rtol=0, atol=0)


def test_normalisation_is_inside_the_model():
    model = create_tagger("i2v_small", image_size=64).eval()
    x = images(2, 64)
    as_float = x.float()
    with torch.no_grad():
        from_uint8, from_float = model(x), model(as_float)
    for name in from_uint8:
        torch.testing.assert_close(from_uint8[name], from_float[name], rtol=0, atol=0)
    assert torch.equal(as_float, x.float())  # the caller's tensor is left alone
    expected = (x.float() / 255 - torch.tensor(model.cfg.mean).view(1, 3, 1, 1)) / torch.tensor(model.cfg.std).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(model.normalize(x), expected)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    assert model.normalize(channels_last).is_contiguous(memory_format=torch.channels_last)
    assert "input_scale" not in model.state_dict()  # the config owns normalisation, not the weights file


def test_imagenet_vgg16_convolutions_load_in_order():
    with torch.device("meta"):
        vgg = timm.create_model("vgg16")
    vgg.features.to_empty(device="cpu")  # only the convolutions get memory; the 100M-parameter classifier stays meta
    for p in vgg.features.parameters():
        torch.nn.init.normal_(p)
    seed = I2VVGG16()
    load_imagenet_vgg16(seed, vgg)
    theirs = [m for m in vgg.features if isinstance(m, torch.nn.Conv2d)]
    for ours, src in zip(seed.convs(), theirs, strict=True):
        assert torch.equal(ours.weight, src.weight) and torch.equal(ours.bias, src.bias)
    with torch.device("meta"):
        vgg11 = timm.create_model("vgg11")
    with pytest.raises(ValueError, match="not a VGG16"):
        load_imagenet_vgg16(seed, vgg11)


def test_the_small_preset_pools_average_and_maximum_and_keeps_them_through_json():
    model = create_tagger("i2v_small", image_size=64).eval()
    assert model.cfg.global_pool == "catavgmax"
    x = images(2, 64)
    with torch.no_grad():
        fmap = model.forward_features(x)
        feature = model.extract_feature(x)
    assert feature.shape == (2, 2 * fmap.shape[1]) == (2, model.num_features)
    # Either half is one of the two poolings (timm puts the average first).
    halves = {"avg": fmap.mean((2, 3)), "max": fmap.amax((2, 3))}
    first, second = feature[:, : fmap.shape[1]], feature[:, fmap.shape[1] :]
    torch.testing.assert_close(first, halves["avg"])
    torch.testing.assert_close(second, halves["max"])
    again = create_tagger(TaggerConfig.from_dict(json.loads(json.dumps(model.cfg.to_dict()))))
    assert again.cfg == model.cfg and again.num_features == model.num_features
    # timm before 1.0.31 leaves the concatenation out of head_hidden_size: the width must not depend on it.
    model.backbone.head_hidden_size = model.backbone.num_features
    assert model.num_features == feature.shape[1]
    # A config saved before pooling was a field (no global_pool) loads with the backbone's own average.
    old = {k: v for k, v in model.cfg.to_dict().items() if k != "global_pool"}
    assert create_tagger(TaggerConfig.from_dict(old)).num_features == fmap.shape[1]
