"""How each WD front end reads a tagger's files, in our words: where it looks for them, the order of the outputs it
reads, how it finds each category's rows, the input it builds and its default thresholds.

Written from each front end's source at the commit named in its section (read, not copied; run nowhere here), so that
our exports can be checked against the rules they are read by. Each reader returns what the front end would print
for an image: its tags, in its order, with its own spelling of names. Where a front end resizes with OpenCV (not
installed here), PIL's BOX (area) and BICUBIC filters stand in; the conformance tests feed pictures already at the
model's size, which no front end resizes, so that the comparison with `i2v tag` is exact.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps


@dataclass
class Read:
    """What a front end makes of one image: general and character tags (name, score) in its order, the rating it
    would pick, and the caption it writes."""

    general: list[tuple[str, float]] = field(default_factory=list)
    character: list[tuple[str, float]] = field(default_factory=list)
    rating: str | None = None
    caption: str = ""


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _pad_square(bgr: np.ndarray) -> np.ndarray:
    """White padding to a square, the extra pixel on the bottom and right (every front end's `// 2`)."""
    h, w = bgr.shape[:2]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    return np.pad(bgr, ((top, side - h - top), (left, side - w - left), (0, 0)), constant_values=255)


def _resize_bgr(bgr: np.ndarray, size: int, shrink: Image.Resampling, grow: Image.Resampling) -> np.ndarray:
    if bgr.shape[0] == size:
        return bgr
    rgb = Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]))
    return np.asarray(rgb.resize((size, size), shrink if bgr.shape[0] > size else grow))[:, :, ::-1]


# ---- kohya-ss/sd-scripts, finetune/tag_images_by_wd14_tagger.py at fc40a279 (2025-06-15; the file as changed in
# bcd3a5a6, 2025-06-13): the mid-2025 version. Run with --onnx.

KOHYA_IMAGE_SIZE = 448  # IMAGE_SIZE, fixed
KOHYA_THRESHOLD = 0.35  # --thresh; --general_threshold and --character_threshold default to it


def kohya_model_location(model_dir: Path, repo_id: str) -> Path:
    """MODEL_DIR/REPO_ID with every "/" as "_"; when that folder exists nothing is downloaded."""
    return Path(os.path.join(model_dir, repo_id.replace("/", "_")))


def kohya_input(path: Path) -> np.ndarray:
    """PIL convert("RGB") (transparency is dropped, not composited), RGB -> BGR, padded white to a square, resized to
    448 (cv2 INTER_AREA when shrinking, PIL LANCZOS when growing), float32 0..255, NHWC."""
    image = np.array(Image.open(path).convert("RGB"))[:, :, ::-1]
    image = _resize_bgr(_pad_square(image), KOHYA_IMAGE_SIZE, Image.Resampling.BOX, Image.Resampling.LANCZOS)
    return image.astype(np.float32)


def kohya_tag(
    model_dir: Path,
    repo_id: str,
    images: list[Path],
    general_threshold: float = KOHYA_THRESHOLD,
    character_threshold: float = KOHYA_THRESHOLD,
    batch_size: int = 1,
) -> list[Read]:
    """The script's reading: the labels by category ("9", "0", "4" as strings) in file order; output 0 of a batch
    (`run(None, ...)[0]`); its first 4 values the ratings (arg-max); every later value i is general tag i while
    i < len(general), else character tag i - len(general), kept when >= its threshold. A value past the last
    character is an IndexError, as in the script. The caption lists the tags in that order, ", " between them."""
    location = kohya_model_location(model_dir, repo_id)
    assert location.exists(), f"kohya would download {repo_id} from the Hugging Face Hub into {location}"
    session = _session(location / "model.onnx")
    fixed = session.get_inputs()[0].shape[0]
    if isinstance(fixed, int) and fixed > 0 and fixed != batch_size:
        batch_size = fixed  # the script takes the file's batch size
    with open(location / "selected_tags.csv", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, rows = rows[0], rows[1:]
    assert header[0] == "tag_id" and header[1] == "name" and header[2] == "category", f"unexpected csv: {header}"
    rating_tags = [r[1] for r in rows if r[2] == "9"]
    general_tags = [r[1] for r in rows if r[2] == "0"]
    character_tags = [r[1] for r in rows if r[2] == "4"]
    out = []
    for start in range(0, len(images), batch_size):
        batch = np.array([kohya_input(p) for p in images[start : start + batch_size]])
        probs = session.run(None, {session.get_inputs()[0].name: batch})[0][: len(batch)]
        for prob in probs:
            read = Read(rating=rating_tags[int(prob[:4].argmax())])
            for i, p in enumerate(prob[4:]):
                if i < len(general_tags) and p >= general_threshold:
                    read.general.append((general_tags[i], float(p)))
                elif i >= len(general_tags) and p >= character_threshold:
                    read.character.append((character_tags[i - len(general_tags)], float(p)))
            read.caption = ", ".join(t for t, _ in read.general + read.character)
            out.append(read)
    return out


# ---- pythongosssss/ComfyUI-WD14-Tagger, wd14tagger.py at 9e0a6e7 (2025-07-11).

COMFYUI_THRESHOLD, COMFYUI_CHARACTER_THRESHOLD = 0.35, 0.85  # the node's defaults


def comfyui_installed(models_dir: Path) -> list[str]:
    """The models it lists: every NAME.onnx in its models folder that has NAME.csv beside it."""
    return [m for m in os.listdir(models_dir) if m.endswith(".onnx") and (models_dir / (m[:-5] + ".csv")).exists()]


def comfyui_input(image: Image.Image, height: int) -> np.ndarray:
    """The node gets RGB (ComfyUI's IMAGE); it shrinks (or grows) the longer side to the input's height with
    LANCZOS first, then pastes onto a white square; RGB -> BGR; float32 0..255; a batch of one."""
    ratio = float(height) / max(image.size)
    new_size = tuple(int(x * ratio) for x in image.size)
    image = image.resize(new_size, Image.Resampling.LANCZOS)
    square = Image.new("RGB", (height, height), (255, 255, 255))
    square.paste(image, ((height - new_size[0]) // 2, (height - new_size[1]) // 2))
    return np.expand_dims(np.array(square).astype(np.float32)[:, :, ::-1], 0)


def comfyui_tag(
    models_dir: Path,
    model: str,
    image: Image.Image,
    threshold: float = COMFYUI_THRESHOLD,
    character_threshold: float = COMFYUI_CHARACTER_THRESHOLD,
    replace_underscore: bool = False,
) -> Read:
    """Its reading: output 0, zipped with the CSV's names; general = the rows from the first category-0 row up to the
    first category-4 row, character = every row from the first category-4 row to the end; strictly above each
    threshold; printed characters first, then general, "(" and ")" escaped."""
    name = model[:-5] if model.endswith(".onnx") else model
    assert name + ".onnx" in comfyui_installed(models_dir), f"ComfyUI would download {name}"
    session = _session(models_dir / f"{name}.onnx")
    height = session.get_inputs()[0].shape[1]
    tags, general_index, character_index = [], None, None
    with open(models_dir / f"{name}.csv") as f:
        reader = csv.reader(f)
        next(reader)
        for row in reader:
            if general_index is None and row[2] == "0":
                general_index = reader.line_num - 2
            elif character_index is None and row[2] == "4":
                character_index = reader.line_num - 2
            tags.append(row[1].replace("_", " ") if replace_underscore else row[1])
    label = session.get_outputs()[0].name
    probs = session.run([label], {session.get_inputs()[0].name: comfyui_input(image.convert("RGB"), height)})[0]
    result = list(zip(tags, probs[0].astype(float), strict=False))  # zip stops at the shorter, as theirs
    general = [item for item in result[general_index:character_index] if item[1] > threshold]
    character = [item for item in result[character_index:] if item[1] > character_threshold]
    caption = ", ".join(t.replace("(", "\\(").replace(")", "\\)") for t, _ in character + general)
    return Read(general, character, None, caption)


# ---- the stable-diffusion-webui tagger: picobyte's fork at e72d984 (2023-11-04), the one that loads local ONNX
# models (toriato's original, at 99bf7d8, only downloads from the Hub; its reading of output 0 is the same).

WEBUI_THRESHOLD = 0.35  # "Weight threshold", one for every tag
WEBUI_MAX_TAGS = 100  # tagger_count_threshold
WEBUI_KNOWN_FOLDERS = ("wd-v1-4-convnextv2-tagger-v2", "Z3D-E621-Convnext")  # the local folders it builds a model for


def webui_scan(onnx_path: Path) -> dict[str, tuple[Path, Path]]:
    """refresh_interrogators over models/TaggerOnnx: a folder needs exactly one .onnx and a .csv (two or more .csv
    files: its sort key returns None, and sorting them raises TypeError); a folder whose name it does not know raises
    NotImplementedError (for every folder, the whole list fails); a name it knows from the Hub keeps downloading."""
    found = {}
    for path in os.scandir(onnx_path):
        if not path.is_dir():
            continue
        onnx_files = [x for x in os.scandir(path) if x.name.endswith(".onnx")]
        if len(onnx_files) != 1:
            continue
        csvs = [x for x in os.scandir(path) if x.name.endswith(".csv")]
        if not csvs:
            continue
        if len(csvs) > 1:
            raise TypeError("'<' not supported between instances of 'NoneType' and 'NoneType'")
        if path.name not in WEBUI_KNOWN_FOLDERS:
            raise NotImplementedError(f"Add {path.name} resolution similar to above here")
        found[path.name] = (Path(path, onnx_files[0].name), Path(path, csvs[0].name))
    return found


def webui_input(image: Image.Image, height: int) -> np.ndarray:
    """Transparency pasted on white, RGB -> BGR, padded white to a square at least the input's size (a smaller
    picture is padded, not enlarged), then cv2 INTER_AREA down or INTER_CUBIC up; float32; a batch of one."""
    image = image.convert("RGBA")
    white = Image.new("RGBA", image.size, "WHITE")
    white.paste(image, mask=image)
    bgr = np.asarray(white.convert("RGB"))[:, :, ::-1]
    h, w = bgr.shape[:2]
    side = max(h, w, height)
    top, left = (side - h) // 2, (side - w) // 2
    bgr = np.pad(bgr, ((top, side - h - top), (left, side - w - left), (0, 0)), constant_values=255)
    bgr = _resize_bgr(bgr, height, Image.Resampling.BOX, Image.Resampling.BICUBIC)
    return np.expand_dims(bgr.astype(np.float32), 0)


def webui_tag(model: Path, tags_csv: Path, image: Image.Image, threshold: float = WEBUI_THRESHOLD) -> Read:
    """WaifuDiffusionInterrogator.interrogate: output 0 becomes a column of the CSV read by pandas (a length that
    differs is a ValueError); rows 0-3 are the ratings, every later row a tag; the UI keeps, highest first, the tags
    at or above its one threshold, at most 100. General and character tags are not told apart."""
    import pandas as pd

    session = _session(model)
    height = session.get_inputs()[0].shape[1]
    label = session.get_outputs()[0].name
    confidences = session.run([label], {session.get_inputs()[0].name: webui_input(image, height)})[0]
    table = pd.read_csv(tags_csv)[["name"]]
    table["confidences"] = confidences[0]
    ratings = dict(table[:4].values)
    tags = sorted(dict(table[4:].values).items(), key=lambda kv: kv[1], reverse=True)
    kept = [(t, float(v)) for t, v in tags[:WEBUI_MAX_TAGS] if v >= threshold]
    return Read(kept, [], max(ratings, key=ratings.get), ", ".join(t for t, _ in kept))


# ---- jhc13/taggui at 141801d (2025-05-21): taggui/auto_captioning/models/wd_tagger.py, models_list.py and
# widgets/auto_captioner.py.

TAGGUI_MIN_PROBABILITY, TAGGUI_MAX_TAGS = 0.4, 30  # the Auto-Captioner's defaults
TAGGUI_KAOMOJIS = ["0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o"]
TAGGUI_KAOMOJIS += ["@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"]
# get_model_class checks these words in the lower-cased model path before "wd" and "tagger".
TAGGUI_EARLIER = ("cogvlm", "florence", "joycaption", "kosmos", "llava", "moondream", "phi-3")


def taggui_models(models_dir: Path) -> list[str]:
    """The local models it lists: the folder of every config.json or selected_tags.csv under its models directory,
    as full paths, sorted."""
    found = set(models_dir.glob("**/config.json")) | set(models_dir.glob("**/selected_tags.csv"))
    return sorted(str(p.parent) for p in found)


def taggui_is_wd_tagger(model_id: str) -> bool:
    lowered = model_id.lower()
    return not any(w in lowered for w in TAGGUI_EARLIER) and "wd" in lowered and "tagger" in lowered


def taggui_input(path: Path, height: int) -> np.ndarray:
    """EXIF rotation, RGBA composited onto white, padded white to a square, resized with BICUBIC when its side is
    not the input's; RGB -> BGR; float32; a batch of one."""
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGBA")
    canvas = Image.new("RGBA", image.size, (255, 255, 255))
    canvas.alpha_composite(image)
    image = canvas.convert("RGB")
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    if side != height:
        square = square.resize((height, height), resample=Image.Resampling.BICUBIC)
    return np.expand_dims(np.array(square, dtype=np.float32)[:, :, ::-1], 0)


def taggui_tag(
    model_id: str, path: Path, min_probability: float = TAGGUI_MIN_PROBABILITY, max_tags: int = TAGGUI_MAX_TAGS
) -> Read:
    """WdTaggerModel: model.onnx and selected_tags.csv in the folder (else the Hub); names with "_" as " " (not the
    kaomojis); output 0 without the category-9 rows, zipped with the other names; kept when >= the minimum
    probability, highest first, at most `max_tags`. General and character tags are not told apart."""
    assert taggui_is_wd_tagger(model_id), f"taggui would not take {model_id} for a WD tagger"
    assert (Path(model_id) / "model.onnx").is_file(), f"taggui would download {model_id}"
    session = _session(Path(model_id) / "model.onnx")
    tags, ratings = [], []
    with open(Path(model_id) / "selected_tags.csv") as f:
        for index, line in enumerate(csv.DictReader(f)):
            tag = line["name"]
            tags.append(tag if tag in TAGGUI_KAOMOJIS else tag.replace("_", " "))
            if line["category"] == "9":
                ratings.append(index)
    height = session.get_inputs()[0].shape[1]
    out = session.get_outputs()[0].name
    probs = session.run([out], {session.get_inputs()[0].name: taggui_input(path, height)})[0][0].astype(np.float32)
    tags = [t for i, t in enumerate(tags) if i not in ratings]
    probs = np.array([p for i, p in enumerate(probs) if i not in ratings])
    kept = sorted(
        ((t, float(p)) for t, p in zip(tags, probs, strict=False) if p >= min_probability),
        key=lambda x: x[1],
        reverse=True,
    )
    kept = kept[:max_tags]
    return Read(kept, [], None, ", ".join(t for t, _ in kept))
