"""i2v train --init: the model to extend (a run, RUN@EPOCH, a bundle, a WD tagger v3 snapshot), the merged
vocabulary and heads, and an extended run end to end (export straight after, evaluate on two data sets, resume)."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from illust2vec.errors import UserError
from illust2vec.formats.categories import RATING_IDS
from illust2vec.formats.run import init_path, list_checkpoints, read_metrics, resolve_epoch
from illust2vec.formats.vocab import Vocab, read_vocab, tag_id
from illust2vec.models import create_tagger, default_heads
from illust2vec.train.config import TrainConfig
from illust2vec.train.init import InitModel, check_arch, extend_model, load_init, merge_vocab
from illust2vec.train.losses import prior_bias


def vocab(rows: list[tuple[str, int]], counts: int = 5) -> Vocab:
    ratings = [(name, 9) for name in RATING_IDS]
    rows = ratings + rows
    ids = tuple(RATING_IDS.get(n, tag_id(n)) for n, _ in rows)
    return Vocab(ids, tuple(n for n, _ in rows), tuple(c for _, c in rows), (counts,) * len(rows))


OLD = vocab([("a", 0), ("b", 0), ("c", 0), ("x", 4), ("y", 4)])
DATA = vocab([("b", 0), ("d", 0), ("c", 0), ("y", 4), ("z", 4), ("q", 1)])


def test_union_keeps_the_old_order_and_adds_the_data_s_new_tags_per_head():
    union = merge_vocab(OLD, DATA, "union")
    assert union.names[4:] == ("a", "b", "c", "d", "x", "y", "z", "q")
    assert list(union.heads) == ["rating", "general", "character", "artist"]
    assert union.tag_ids[4:7] == OLD.tag_ids[4:7]
    assert merge_vocab(OLD, DATA, "data") == DATA
    # Matched by name and category: "b" as a character is another tag than the general "b".
    other = merge_vocab(OLD, vocab([("b", 4)]), "union")
    assert other.head_names("character") == ("x", "y", "b")


def tiny(v: Vocab, seed: int = 0):
    torch.manual_seed(seed)
    sizes = {h: len(rows) for h, rows in v.heads.items()}
    return create_tagger("test_resnet", heads=default_heads(sizes), image_size=32).eval()


@pytest.mark.parametrize("mode", ["union", "data"])
def test_shared_rows_are_copied_exactly_new_rows_start_at_the_prior_dropped_rows_are_gone(mode):
    old = tiny(OLD)
    init = InitModel(old, OLD, None, {"model": "old"})
    merged = merge_vocab(OLD, DATA, mode)
    counts = {h: [3 + i for i in range(len(rows))] for h, rows in DATA.heads.items()}
    model = extend_model(init, merged, DATA, counts, 40, {}).eval()
    ours, theirs = model.state_dict(), old.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in ours.items() if k.startswith("backbone."))
    for head in ("general", "character"):
        new_w, new_b = ours[f"heads.{head}.fc.weight"], ours[f"heads.{head}.fc.bias"]
        old_w, old_b = theirs[f"heads.{head}.fc.weight"], theirs[f"heads.{head}.fc.bias"]
        for i, name in enumerate(merged.head_names(head)):
            if name in OLD.head_names(head):  # kept: the very same row
                j = OLD.head_names(head).index(name)
                assert torch.equal(new_w[i], old_w[j]) and new_b[i] == old_b[j], name
            else:  # new: zero weights, the bias of its frequency in DATA's training split
                k = DATA.head_names(head).index(name)
                assert not new_w[i].any()
                assert new_b[i].item() == pytest.approx(prior_bias(counts[head], 40, "sigmoid")[k].item(), rel=1e-6)
    dropped = {"union": set(), "data": {"a", "x"}}[mode]
    assert dropped == set(OLD.names) - set(merged.names)
    # A category new to the model (artist) is a new head, its biases at the prior.
    assert model.heads["artist"].fc.bias.tolist() == pytest.approx(prior_bias(counts["artist"], 40, "sigmoid").tolist())
    # On any image, a new tag's probability is its prior.
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        probs = model.activate(model(images))
    d = merged.head_names("general").index("d")
    assert torch.allclose(probs["general"][:, d], torch.sigmoid(model.heads["general"].fc.bias[d]).expand(3))


def test_init_from_a_run_an_epoch_of_it_and_a_bundle(synth_run, synth_bundle):
    best = load_init(str(synth_run))
    first, last = load_init(f"{synth_run}@1"), load_init(f"{synth_run}@last")
    assert (best.source["kind"], best.source["epoch"]) == ("run", resolve_epoch(synth_run, "best"))
    assert (first.source["epoch"], last.source["epoch"]) == (1, 2)
    assert best.vocab == read_vocab(synth_run / "selected_tags.csv")
    bias = [m.model.state_dict()["heads.general.fc.bias"] for m in (first, last)]
    assert not torch.equal(*bias)  # two epochs, two models
    bundle = load_init(str(synth_bundle))
    assert bundle.source["kind"] == "bundle" and "f1" in bundle.thresholds.method  # the bundle's calibrated ones
    epoch = json.loads((synth_bundle / "config.json").read_text())["source"]["epoch"]
    x = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8)
    with torch.no_grad():
        a, b = bundle.model(x), (first if epoch == 1 else last).model(x)
    assert all(torch.allclose(a[h], b[h]) for h in a)
    check_arch(None, bundle.model)
    check_arch("test_resnet", bundle.model)
    with pytest.raises(UserError, match="--arch resnet18: the model comes from --init"):
        check_arch("resnet18", bundle.model)


def test_an_init_model_whose_files_are_missing_or_inconsistent_is_one_line(synth_run, synth_bundle, tmp_path):
    with pytest.raises(UserError, match="no such run, bundle or WD tagger snapshot"):
        load_init(str(tmp_path / "nope"))
    run = tmp_path / "run"
    shutil.copytree(synth_run, run)
    text = (run / "selected_tags.csv").read_text().replace(",1girl,", ",one_girl,", 1)
    (run / "selected_tags.csv").write_text(text)
    with pytest.raises(UserError, match="is not the vocabulary the run was trained on"):
        load_init(str(run))
    with pytest.raises(UserError, match="no checkpoint for epoch 7"):
        load_init(f"{synth_run}@7")
    bundle = tmp_path / "bundle"
    shutil.copytree(synth_bundle, bundle)
    (bundle / "model.safetensors").unlink()
    with pytest.raises(UserError, match="cannot read weights"):
        load_init(str(bundle))
    tags = (bundle / "selected_tags.csv").read_text()
    (bundle / "selected_tags.csv").write_text(tags.replace(",1girl,", ",one_girl,", 1))
    with pytest.raises(UserError, match="not the vocabulary the model was trained on"):
        load_init(str(bundle))


# ---- a WD tagger v3 timm snapshot (random weights), as SmilingWolf publishes them

WD_SIZE = 32
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # unequal: shows the channel order


def wd_snapshot(out, names):
    """timm's save_for_hf layout of a test ViT with the WD v3 ViT's arguments, and a selected_tags.csv."""
    import timm
    from timm.models._hub import save_for_hf

    torch.manual_seed(0)
    args = dict(img_size=WD_SIZE, class_token=False, global_pool="avg", fc_norm=False, act_layer="gelu_tanh")
    model = timm.create_model("test_vit", num_classes=len(names), **args).eval()
    with torch.no_grad():
        model.head.weight.mul_(20)
    save_for_hf(model, str(out), model_args=args, safe_serialization=True)
    config = json.loads((out / "config.json").read_text())
    config["pretrained_cfg"].update(input_size=[3, WD_SIZE, WD_SIZE], mean=MEAN, std=STD)
    (out / "config.json").write_text(json.dumps(config))
    with open(out / "selected_tags.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["tag_id", "name", "category", "count"])
        w.writerows([tag_id(n) if c != 9 else RATING_IDS[n], n, c, 10] for n, c in names)
    return model


WD_TAGS = [(n, 9) for n in RATING_IDS] + [(f"g{i}", 0) for i in range(6)] + [("1girl", 0), ("w_char", 4)]


def test_a_wd_snapshot_becomes_our_tagger_computing_the_same_function(tmp_path):
    ref = wd_snapshot(tmp_path, WD_TAGS)
    init = load_init(str(tmp_path))
    assert init.source["kind"] == "wd" and init.model.cfg.backbone == "test_vit"
    assert [h.name for h in init.model.cfg.heads] == ["rating", "general", "character"]
    rgb = torch.randint(0, 256, (2, 3, WD_SIZE, WD_SIZE), dtype=torch.uint8)
    # The WD reference (wdv3_timm.py): normalise RGB with the config's mean and std, then reorder to BGR.
    x = (rgb.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = torch.sigmoid(ref(x[:, [2, 1, 0]]))
        logits = init.model(rgb)
    got = torch.cat([torch.sigmoid(logits[h]) for h in ("rating", "general", "character")], dim=1)
    assert (got - want).abs().max() < 1e-4
    assert want[:, 4:].std() > 0.1  # the outputs differ from image to image and tag to tag: a real comparison


def test_a_broken_wd_snapshot_is_one_line(tmp_path):
    wd_snapshot(tmp_path, WD_TAGS)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architecture": "vit_from_the_future"}))
    with pytest.raises(UserError, match="has no architecture 'vit_from_the_future'"):
        load_init(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").rename(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="needs config.json, model.safetensors, selected_tags.csv; missing model"):
        load_init(str(tmp_path))


def test_init_settings_are_checked():
    TrainConfig(data="d", out="o", init="m", arch="test_resnet", model={"freeze": "stem"})
    cfg = TrainConfig(data="d", out="o", init="m")
    assert (cfg.arch, cfg.keep_old, cfg.backbone_lr_scale, cfg.vocab) == (None, 1.0, 0.1, "union")
    assert (TrainConfig(data="d", out="o").arch, TrainConfig(data="d", out="o").backbone_lr_scale) == ("i2v_small", 1)
    for kwargs, message in (
        (dict(keep_old=1.0), "keep_old needs init"),
        (dict(init="m", vocab="all"), "vocab must be one of union, data"),
        (dict(init="m", pretrained=True), "init: pretrained come from the init model"),
        (dict(init="m", model={"global_pool": "avg"}), "init: model global_pool come from the init model"),
        (dict(init="m", backbone_lr_scale=-1), "backbone_lr_scale must be a number of at least 0"),
    ):
        with pytest.raises(UserError, match=message):
            TrainConfig(data="d", out="o", **kwargs)


# ---- an extended run, end to end


@pytest.mark.slow
def test_an_extended_run_exports_evaluates_on_two_sets_and_resumes(synth_run, synth_build, new_build, tmp_path, i2v):
    base = tmp_path / "base"
    shutil.copytree(synth_run, base)
    run = tmp_path / "ext"
    args = ["train", str(new_build), "--out", str(run), "--init", str(base), "--batch-size", "16", "--workers", "0"]
    code, _, err = i2v(*args, "--epochs", "1")
    assert code == 0, err
    said = " ".join(err.split())  # rich wraps at 80 columns
    assert "92 tags kept" in said and "resized to the model's 96 px" in said
    assert "new rows fitted on the original's features" in said  # DATA labels old characters too: the probe runs
    config = json.loads((run / "config.json").read_text())
    merged = read_vocab(run / "selected_tags.csv")
    assert config["vocab_hash"] == merged.hash
    assert config["data_vocab_hash"] == read_vocab(new_build / "selected_tags.csv").hash
    assert config["init"]["kind"] == "run" and config["init"]["rows"]["dropped"] == 0
    assert config["init"]["rows"]["new"] == len(merged) - len(read_vocab(base / "selected_tags.csv")) > 0
    assert (init_path(run) / "model.safetensors").exists()
    row = read_metrics(run)[0]
    for key in ("val/general/mAP", "val/old/general/mAP", "val/new/general/mAP", "val/new/artist/top1"):
        assert key in row, key
    assert row["train/keep_old/loss"] > 0
    assert 0 <= row["val/new/general/mAP"] <= 1

    # export straight after: calibrated on DATA's val split; the tags it never shows keep the original's thresholds
    code, _, err = i2v("export", str(run), "--out", str(tmp_path / "bundle"), "--workers", "0")
    assert code == 0, err
    bundle = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert bundle["source"]["init"]["path"] == str(base)
    thresholds = json.loads((tmp_path / "bundle" / "thresholds.json").read_text())
    assert "never shows keep the original model's thresholds" in thresholds["method"] and thresholds["tags"]

    # evaluate on the old data and the new: each reported and written apart
    two = ["--data", str(synth_build), "--data", str(new_build)]
    code, out, err = i2v("evaluate", str(run), *two, "--workers", "0", "--json")
    assert code == 0, err
    old, new = json.loads(out)
    assert (old["data"], new["data"]) == (str(synth_build), str(new_build))
    assert "artist" in new["heads"] and "artist" not in old["heads"]
    assert old["out"] != new["out"]
    assert (Path(old["out"]) / "metrics.json").exists() and (Path(new["out"]) / "metrics.json").exists()

    # resume: the original comes from RUN/init/, whatever became of --init's directory
    shutil.rmtree(base)
    code, _, err = i2v(*args, "--epochs", "2", "--resume")
    assert code == 0, err
    assert list_checkpoints(run) == [1, 2] and "resuming" in err


@pytest.mark.slow
def test_a_wd_snapshot_extended_with_a_rating_head_of_its_own(new_build, tmp_path):
    from illust2vec.train.loop import fit

    wd_snapshot(tmp_path / "wd", [(f"g{i}", 0) for i in range(4)] + [("1girl", 0)])  # no rating, no character
    summary = fit(
        TrainConfig(data=str(new_build), out=str(tmp_path / "run"), init=str(tmp_path / "wd"), epochs=1,
                    batch_size=16, workers=0, max_steps_per_epoch=2, vocab="union")
    )  # fmt: skip
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    heads = {h["name"]: h["activation"] for h in config["model"]["heads"]}
    assert heads["rating"] == "softmax" and {"general", "character", "copyright", "artist"} <= set(heads)
    assert config["model"]["backbone_args"]["class_token"] is False and config["image_size"] == WD_SIZE
    assert np.isfinite(summary.last["val/general/mAP"])
