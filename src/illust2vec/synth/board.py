"""The synthetic board's posts: metadata with known tags, and their files rendered lazily and cached."""

from __future__ import annotations

import hashlib
import io
import json
import random
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import numpy as np
from PIL import Image

from .cast import (
    ACCESSORIES,
    BACKGROUNDS,
    EXPRESSIONS,
    EYE_COLOURS,
    FRAMINGS,
    HAIR_COLOURS,
    HAIRSTYLES,
    OUTFITS,
    RATING_TAGS,
    RATING_WEIGHTS,
    Character,
    SynthConfig,
    World,
    make_world,
)
from .draw import Figure, Scene, render

IMAGE_EXTS = ("jpg", "png", "webp", "gif")
SAMPLE_WIDTH = 850  # Danbooru's samples are 850 px wide; larger posts have one (has_large)
PREVIEW_SIZE = 180
EPOCH = datetime(2015, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class SynthPost:
    """One post of the synthetic board, with the tags a board would show and the truth behind them."""

    id: int
    created_at: datetime
    rating: str
    score: int
    source: str
    parent_id: int | None
    is_deleted: bool
    is_banned: bool
    file_ext: str
    width: int
    height: int
    tags: dict[str, list[str]]  # general, character, copyright, artist, meta: as the board shows them
    true_general: tuple[str, ...]  # every general tag of what is drawn, before label noise
    scene: Scene = field(repr=False)
    encoding: dict = field(default_factory=dict, repr=False)  # progressive, cmyk, palette, quality

    @property
    def is_image(self) -> bool:
        return self.file_ext in IMAGE_EXTS

    @property
    def tag_string(self) -> str:
        return " ".join(sorted(t for group in self.tags.values() for t in group))

    @property
    def is_hidden(self) -> bool:
        """Whether the board hides the post's file from anonymous users: deleted or banned."""
        return self.is_deleted or self.is_banned


def unit(seed: int, label: str, n: int) -> float:
    """A uniform number in [0, 1) that depends only on its arguments, for draws that must not share a stream."""
    digest = hashlib.blake2b(f"{seed}/{label}/{n}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def scene_tags(scene: Scene) -> list[str]:
    """The general tags that follow from a scene: traits, counts, background, expression, framing, props."""
    tags: set[str] = set()
    for f in scene.figures:
        tags |= {f.hair, f.eyes, *HAIRSTYLES[f.hairstyle], *f.accessories, *f.expression}
        if scene.rating != "e":
            tags |= set(OUTFITS[f.outfit][0])
    tags |= set(RATING_TAGS[scene.rating])
    girls = sum(f.girl for f in scene.figures)
    boys = len(scene.figures) - girls
    if girls:
        tags.add(f"{girls}girl" if girls == 1 else f"{girls}girls")
    if boys:
        tags.add(f"{boys}boy" if boys == 1 else f"{boys}boys")
    if girls > 1:
        tags.add("multiple_girls")
    if boys > 1:
        tags.add("multiple_boys")
    if len(scene.figures) == 1:
        tags.add("solo")
    tags |= {"transparent_background"} if scene.background == "transparent" else set(BACKGROUNDS[scene.background])
    tags.add(scene.framing)
    tags |= {tag for tag, _ in scene.props}
    return sorted(tags)


def _size(rng: random.Random, cfg: SynthConfig) -> tuple[int, int]:
    # Most posts are mid-sized with a tail of large ones, as on a board; portrait dominates.
    long = int(cfg.min_size * 1.3 + (cfg.max_size - cfg.min_size * 1.3) * rng.random() ** 1.7)
    ratio = rng.choice([rng.uniform(0.55, 0.9)] * 6 + [rng.uniform(0.6, 0.9)] * 3 + [1.0])
    short = max(cfg.min_size, int(long * ratio))
    return (short, long) if rng.random() < 0.65 else (long, short)


def _format(rng: random.Random, cfg: SynthConfig) -> tuple[str, dict]:
    r = rng.random()
    if r < cfg.non_image_fraction:
        return rng.choice(["zip", "mp4"]), {}
    r = rng.random()
    if r < 0.6:
        return "jpg", {"quality": rng.randint(80, 95), "progressive": rng.random() < 0.25, "cmyk": rng.random() < 0.06}
    if r < 0.86:
        return "png", {"alpha": rng.random() < 0.3, "palette": rng.random() < 0.2}
    if r < 0.95:
        return "webp", {"quality": rng.randint(80, 92)}
    return "gif", {}


def _figure(rng: random.Random, world: World, cast_member) -> Figure:
    if cast_member is not None:
        c = cast_member
        traits = dict(
            girl=c.girl, hair=c.hair, eyes=c.eyes, hairstyle=c.hairstyle, accessories=c.accessories, outfit=c.outfit
        )
    else:  # an original character: a fresh combination of traits
        n_acc = rng.choices([0, 1, 2], weights=[0.4, 0.4, 0.2])[0]
        traits = dict(
            girl=rng.random() < 0.85,
            hair=rng.choice(list(HAIR_COLOURS)),
            eyes=rng.choice(list(EYE_COLOURS)),
            hairstyle=rng.choice(list(HAIRSTYLES)),
            accessories=tuple(sorted(rng.sample(ACCESSORIES, n_acc))),
            outfit=rng.choice(list(OUTFITS)),
        )
    expression = tuple(e for e, p in zip(EXPRESSIONS, (0.5, 0.3, 0.25), strict=True) if rng.random() < p)
    return Figure(expression=expression, **traits)


@dataclass(frozen=True)
class _Odds:
    """How likely each character and artist is to be drawn, and who shares a series: fixed for a world."""

    characters: list[float]
    artists: list[float]
    by_series: dict[str, list[int]]  # series name -> indices of its characters

    @classmethod
    def of(cls, world: World) -> _Odds:
        by_series: dict[str, list[int]] = {}
        for i, c in enumerate(world.characters):
            by_series.setdefault(c.series, []).append(i)
        artists = [1.0 / (k + 1) ** 0.8 for k in range(len(world.artists))]
        return cls(world.character_weights, artists, by_series)


def make_posts(world: World) -> list[SynthPost]:
    """Generate every post's metadata and scene (cheap: no pixels are drawn here)."""
    cfg = world.config
    rng = random.Random(f"posts-{cfg.seed}")
    odds = _Odds.of(world)
    posts: list[SynthPost] = []
    post_id = 0
    for _ in range(cfg.posts):
        post_id += rng.choices([1, 2, 3, 7], weights=[0.8, 0.12, 0.06, 0.02])[0]
        posts.append(_make_post(post_id, world, odds, posts))
    return posts


def _make_post(post_id: int, world: World, odds: _Odds, earlier: list[SynthPost]) -> SynthPost:
    """One post. It draws from its own random stream, seeded by its id, in a fixed order: same seed, same post."""
    cfg = world.config
    prng = random.Random(f"post-{cfg.seed}-{post_id}")
    ext, encoding = _format(prng, cfg)
    width, height = _size(prng, cfg)
    parent = None
    if earlier and prng.random() < cfg.child_fraction:
        parent = prng.choice(earlier[-50:])
        if not parent.scene.figures:
            parent = None
    if parent is not None:
        scene, chars, series_tags = _variant(prng, parent, world, width, height)
    else:
        scene, chars, series_tags = _new_picture(prng, world, odds, encoding.get("alpha", False), width, height)
    # A picture with an alpha channel and a transparent background go together.
    if encoding.get("alpha") and scene.background != "transparent":
        encoding = {**encoding, "alpha": False}
    if scene.background == "transparent" and not encoding.get("alpha"):
        scene = replace(scene, background="white")
    true_general = scene_tags(scene)
    tags = _board_tags(prng, cfg, scene, true_general, ext, chars, series_tags)
    return SynthPost(
        id=post_id,
        created_at=EPOCH + timedelta(hours=post_id * 1.7, seconds=prng.randrange(3600)),
        rating=scene.rating,
        score=int(prng.paretovariate(1.5) * 3) - 2,
        source=f"https://www.pixiv.net/artworks/{40_000_000 + post_id * 13}" if prng.random() < 0.6 else "",
        parent_id=parent.id if parent is not None else None,
        is_deleted=prng.random() < cfg.deleted_fraction,
        is_banned=prng.random() < cfg.banned_fraction,
        file_ext=ext,
        width=width,
        height=height,
        tags=tags,
        true_general=tuple(true_general),
        scene=scene,
        encoding=encoding,
    )


def _variant(
    prng: random.Random, parent: SynthPost, world: World, width: int, height: int
) -> tuple[Scene, list[str], list[str]]:
    """A variant of the parent's picture: the same figures with other expressions; its characters and copyrights."""
    figures = tuple(replace(f, expression=_figure(prng, world, None).expression) for f in parent.scene.figures)
    scene = replace(parent.scene, figures=figures, seed=prng.randrange(2**31), width=width, height=height)
    return scene, parent.tags["character"], parent.tags["copyright"]


def _new_picture(
    prng: random.Random, world: World, odds: _Odds, alpha: bool, width: int, height: int
) -> tuple[Scene, list[str], list[str]]:
    """A new picture of one to three figures (cast members, or original characters); its characters and copyrights."""
    n = prng.choices([1, 2, 3], weights=[0.72, 0.2, 0.08])[0]
    if prng.random() < world.config.original_fraction or not world.characters:
        members: list[Character | None] = [None] * n
        chars, series_tags = [], ["original"]
        palette_src = prng.choice(world.series) if world.series else None
    else:
        members = list(_pick_cast(prng, world, odds, n))
        chars = sorted({c.name for c in members})
        series_tags = sorted({c.series for c in members})
        palette_src = next(s for s in world.series if s.name == members[0].series)
    figures = tuple(_figure(prng, world, m) for m in members)
    rating = prng.choices(list(RATING_WEIGHTS), weights=list(RATING_WEIGHTS.values()))[0]
    if alpha:
        background = "transparent"
    elif palette_src is not None and prng.random() < 0.7:
        background = palette_src.background
    else:
        background = prng.choice(list(BACKGROUNDS))
    palette = palette_src.palette if palette_src else ((201, 201, 211), (135, 181, 231), (111, 171, 91))
    artist = prng.choices(world.artists, weights=odds.artists)[0]
    scene = Scene(
        width=width,
        height=height,
        figures=figures,
        framing=prng.choices(FRAMINGS, weights=[0.2, 0.35, 0.25, 0.2])[0],
        background=background,
        palette=palette,
        rating=rating,
        artist=artist,
        props=tuple(p for p in world.props if prng.random() < 0.15),
        seed=prng.randrange(2**31),
    )
    return scene, chars, series_tags


def _pick_cast(prng: random.Random, world: World, odds: _Odds, n: int) -> list[Character]:
    """n distinct characters, popular ones more often; later picks come from the first one's series 80% of the time."""
    weights = odds.characters
    first = prng.choices(range(len(world.characters)), weights=weights)[0]
    picks = [first]
    for _ in range(n - 1):
        same = [i for i in odds.by_series[world.characters[first].series] if i not in picks]
        if same and prng.random() < 0.8:
            picks.append(prng.choices(same, weights=[weights[i] for i in same])[0])
        else:
            rest = [i for i in range(len(world.characters)) if i not in picks]
            if rest:
                picks.append(prng.choices(rest, weights=[weights[i] for i in rest])[0])
    return [world.characters[i] for i in picks]


def _board_tags(
    prng: random.Random,
    cfg: SynthConfig,
    scene: Scene,
    true_general: list[str],
    ext: str,
    chars: list[str],
    series_tags: list[str],
) -> dict[str, list[str]]:
    """The tags the board shows, by category: the true general tags less label noise, and meta tags of the file."""
    # Label noise: boards miss tags; the truth stays in true_general for evaluation.
    general = [t for t in true_general if prng.random() >= cfg.label_noise]
    meta = []
    if scene.width >= 1600 or scene.height >= 1200:
        meta.append("highres")
    if ext == "zip":
        meta += ["animated", "ugoira"]
    elif ext == "mp4":
        meta += ["animated", "video"]
    if prng.random() < 0.1:
        meta.append("commentary_request")
    return {
        "general": general,
        "character": list(chars),
        "copyright": list(series_tags),
        "artist": [scene.artist.name] if scene.artist else [],
        "meta": sorted(meta),
    }


def draw_post(post: SynthPost, pixel_noise: float = 0.0) -> Image.Image:
    """The post's picture as pixels (RGB, or RGBA for a transparent background)."""
    image = render(post.scene).image
    if pixel_noise > 0:
        rng = np.random.default_rng(post.scene.seed)
        arr = np.asarray(image).astype(np.float32)
        noise = rng.normal(0, pixel_noise, arr.shape[:2] + (3,))
        arr[..., :3] += noise
        image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), image.mode)
    return image


def encode(post: SynthPost, image: Image.Image) -> bytes:
    """The post's file bytes in its format, with the awkward variants of a real board."""
    buf = io.BytesIO()
    enc = post.encoding
    if post.file_ext == "jpg":
        img = image.convert("CMYK") if enc.get("cmyk") else image.convert("RGB")
        img.save(buf, "JPEG", quality=enc.get("quality", 90), progressive=enc.get("progressive", False))
    elif post.file_ext == "png":
        img = image if enc.get("alpha") else image.convert("RGB")
        if enc.get("palette"):
            img = img.convert("P", palette=Image.Palette.ADAPTIVE) if img.mode == "RGB" else img.quantize(255)
        img.save(buf, "PNG", compress_level=3)
    elif post.file_ext == "webp":
        image.convert("RGB").save(buf, "WEBP", quality=enc.get("quality", 85), method=2)
    elif post.file_ext == "gif":
        image.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE).save(buf, "GIF")
    elif post.file_ext == "zip":  # an ugoira: frames as JPEG files plus their timings
        small = image.convert("RGB")
        small.thumbnail((600, 600))
        with zipfile.ZipFile(buf, "w") as z:
            for i in range(3):
                frame = io.BytesIO()
                small.rotate(i * 2, fillcolor=(255, 255, 255)).save(frame, "JPEG", quality=80)
                z.writestr(_zip_member(post, f"{i:06d}.jpg"), frame.getvalue())
            z.writestr(
                _zip_member(post, "animation.json"),
                json.dumps({"frames": [{"file": f"{i:06d}.jpg", "delay": 100} for i in range(3)]}),
            )
    elif post.file_ext == "mp4":
        # An MP4 header and an opaque payload: enough for a crawler to see a non-image file.
        payload = hashlib.sha256(f"mp4-{post.id}".encode()).digest() * 64
        ftyp = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"
        buf.write(ftyp + len(payload).to_bytes(4, "big") + b"mdat" + payload)
    else:
        raise ValueError(f"unknown file_ext {post.file_ext!r}")
    return buf.getvalue()


def _zip_member(post: SynthPost, name: str) -> zipfile.ZipInfo:
    # Dated by the post, not by the clock (as ZipFile.writestr would), so a file rendered again has the same md5.
    info = zipfile.ZipInfo(name, date_time=post.created_at.astimezone(UTC).timetuple()[:6])
    info.external_attr = 0o600 << 16  # what writestr gives a member it names
    return info


class Board:
    """A synthetic board: posts in id order, their files rendered on demand and kept in a bounded cache.

    Thread-safe: the HTTP server renders from several threads. Files are deterministic, so an evicted
    file is rendered again with the same bytes.
    """

    def __init__(self, config: SynthConfig, cache_bytes: int = 256 << 20):
        self.config = config
        self.world = make_world(config)
        self.posts = make_posts(self.world)
        self._by_id = {p.id: p for p in self.posts}
        self._info: dict[int, tuple[str, int]] = {}
        self._files: OrderedDict[int, bytes] = OrderedDict()
        self._cached = 0
        self._cache_bytes = cache_bytes
        self._lock = threading.Lock()

    def get(self, post_id: int) -> SynthPost | None:
        return self._by_id.get(post_id)

    def file(self, post: SynthPost) -> bytes:
        """The post's original file bytes."""
        with self._lock:
            data = self._files.get(post.id)
            if data is not None:
                self._files.move_to_end(post.id)
                return data
        data = encode(post, draw_post(post, self.config.pixel_noise))
        with self._lock:
            self._info[post.id] = (hashlib.md5(data).hexdigest(), len(data))
            if post.id not in self._files:
                self._files[post.id] = data
                self._cached += len(data)
            while self._cached > self._cache_bytes and len(self._files) > 1:
                _, old = self._files.popitem(last=False)
                self._cached -= len(old)
        return data

    def _file_info(self, post: SynthPost) -> tuple[str, int]:
        info = self._info.get(post.id)
        if info is None:
            self.file(post)
            info = self._info[post.id]
        return info

    def md5(self, post: SynthPost) -> str:
        return self._file_info(post)[0]

    def file_size(self, post: SynthPost) -> int:
        return self._file_info(post)[1]

    @staticmethod
    def has_large(post: SynthPost) -> bool:
        """Whether the post has a sample (Danbooru's `has_large`): images wider than the sample width."""
        return post.is_image and post.width > SAMPLE_WIDTH

    def sample(self, post: SynthPost) -> bytes | None:
        """Danbooru's 'large' file: a JPEG 850 px wide, only where `has_large` (its bytes differ from md5)."""
        if not self.has_large(post):
            return None
        image = draw_post(post, self.config.pixel_noise).convert("RGB")
        image = image.resize((SAMPLE_WIDTH, round(post.height * SAMPLE_WIDTH / post.width)), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=85)
        return buf.getvalue()

    def preview(self, post: SynthPost) -> bytes:
        """A JPEG thumbnail that fits in 180x180 (non-image posts get one too, as on Danbooru)."""
        image = draw_post(post, self.config.pixel_noise).convert("RGB")
        image.thumbnail((PREVIEW_SIZE, PREVIEW_SIZE))
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=80)
        return buf.getvalue()
