"""Draw a synthetic illustration from a scene description, logging every tagged thing it paints."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from .cast import EYE_COLOURS, HAIR_COLOURS, HAIRSTYLES, OUTFITS, SKIN, SKIN_SHADE, Artist

WHITE = (255, 255, 255)
EYE_WHITE = (253, 253, 253)
PUPIL = (21, 21, 27)
MOUTH = (167, 45, 55)
BLUSH = (251, 171, 181)
CLOUD = (249, 251, 253)
HAT = (95, 61, 43)
GLASSES = (55, 55, 63)
RIBBON = (227, 33, 75)
HAIRBAND = (253, 223, 65)
FLOWER = (255, 255, 181)
HORN = (215, 205, 181)
HALO = (255, 233, 105)

# Head height as a fraction of the picture height, per framing; the figure is about 4.8 heads tall.
FRAMING_HEAD = {"portrait": 0.42, "upper_body": 0.3, "cowboy_shot": 0.24, "full_body": 0.18}


@dataclass(frozen=True)
class Figure:
    """One character in a picture: its traits (cast member or original) and its expression."""

    girl: bool
    hair: str
    eyes: str
    hairstyle: str
    accessories: tuple[str, ...]
    outfit: str
    expression: tuple[str, ...] = ()


@dataclass(frozen=True)
class Scene:
    """Everything the renderer needs; the post's true general tags follow from it alone."""

    width: int
    height: int
    figures: tuple[Figure, ...]
    framing: str
    background: str  # a key of cast.BACKGROUNDS, or "transparent"
    palette: tuple[tuple[int, int, int], ...]
    rating: str
    artist: Artist
    props: tuple[tuple[str, tuple[int, int, int]], ...] = ()
    seed: int = 0


@dataclass
class Drawing:
    """The picture plus the log of tagged elements actually painted (tests compare it with the tags)."""

    image: Image.Image
    drawn: set[str] = field(default_factory=set)


def _odd(c) -> tuple[int, int, int]:
    return tuple(max(1, min(255, int(v))) | 1 for v in c)


def _shade(c, k: float) -> tuple[int, int, int]:
    # Shades are forced odd so they can never equal an (even) trait colour.
    return _odd(v * k for v in c)


def _mix(a, b, t: float) -> tuple[int, int, int]:
    return _odd(x + (y - x) * t for x, y in zip(a, b, strict=True))


def _saturate(c, s: float) -> tuple[int, int, int]:
    grey = sum(c) / 3
    return _odd(grey + (v - grey) * s for v in c)


def render(scene: Scene) -> Drawing:
    """Paint the scene at its full size; deterministic for a given scene."""
    rng = random.Random(scene.seed)
    w, h = scene.width, scene.height
    mode = "RGBA" if scene.background == "transparent" else "RGB"
    image = Image.new(mode, (w, h), (0, 0, 0, 0) if mode == "RGBA" else WHITE)
    out = Drawing(image)
    d = ImageDraw.Draw(image)
    _background(d, scene, rng, out)
    prop_rng = random.Random(rng.random())  # props are placed from their own stream, drawn after the figures
    n = len(scene.figures)
    col = w / n
    k = FRAMING_HEAD[scene.framing]
    u = min(h * k, col / 1.35)
    for i, fig in enumerate(scene.figures):
        cx = col * (i + 0.5) + rng.uniform(-0.06, 0.06) * col
        top = h * 0.06 + rng.uniform(0, 0.04) * h
        _figure(d, fig, cx, top, u, scene, out)
    # Props go in front of the figures: a prop behind them was tagged but often hidden (a quarter of the tagged
    # stars and moons could not be seen), which is a wrong label rather than a hard one.
    for tag, colour in scene.props:
        _prop(d, tag, colour, scene, prop_rng)
        out.drawn.add(tag)
    out.drawn.add(scene.framing)
    return out


def _background(d: ImageDraw.ImageDraw, scene: Scene, rng: random.Random, out: Drawing) -> None:
    w, h = scene.width, scene.height
    pal = [_saturate(c, scene.artist.saturation) for c in scene.palette]
    style = scene.background
    if style == "transparent":
        out.drawn.add("transparent_background")
        return
    if style == "white":
        d.rectangle([0, 0, w, h], fill=WHITE)
        out.drawn |= {"simple_background", "white_background"}
    elif style == "plain":
        d.rectangle([0, 0, w, h], fill=pal[0])
        out.drawn.add("simple_background")
    elif style in ("sky", "field"):
        horizon = h if style == "sky" else int(h * rng.uniform(0.55, 0.75))
        top, bottom = _shade(pal[1], 0.7), _mix(pal[1], WHITE, 0.6)
        step = max(1, h // 64)
        for y in range(0, horizon, step):
            d.rectangle([0, y, w, y + step], fill=_mix(top, bottom, y / max(1, horizon)))
        out.drawn.add("outdoors")
        if style == "sky":
            for _ in range(rng.randint(2, 5)):
                cx, cy, r = rng.uniform(0, w), rng.uniform(0, h * 0.8), rng.uniform(0.05, 0.12) * min(w, h)
                for dx in (-r, 0, r):
                    d.ellipse([cx + dx - r, cy - r * 0.6, cx + dx + r, cy + r * 0.6], fill=CLOUD)
            out.drawn |= {"sky", "cloud"}
        else:
            d.rectangle([0, horizon, w, h], fill=pal[2])
            blade = _shade(pal[2], 0.75)
            for _ in range(40):
                x, y = rng.uniform(0, w), rng.uniform(horizon, h)
                d.line([x, y, x + rng.uniform(-3, 3), y - h * 0.02], fill=blade, width=max(1, w // 400))
    elif style == "indoors":
        floor = int(h * 0.7)
        d.rectangle([0, 0, w, floor], fill=pal[0])
        d.rectangle([0, floor, w, h], fill=_shade(pal[1], 0.8))
        wx, wy = w * rng.uniform(0.05, 0.6), h * 0.1
        ww, wh = w * 0.3, h * 0.3
        d.rectangle(
            [wx, wy, wx + ww, wy + wh],
            fill=_mix(pal[1], WHITE, 0.7),
            outline=_shade(pal[0], 0.5),
            width=max(2, w // 150),
        )
        d.line([wx + ww / 2, wy, wx + ww / 2, wy + wh], fill=_shade(pal[0], 0.5), width=max(2, w // 200))
        out.drawn.add("indoors")
    else:
        raise ValueError(f"unknown background {style!r}")


def _prop(d: ImageDraw.ImageDraw, tag: str, colour, scene: Scene, rng: random.Random) -> None:
    w, h = scene.width, scene.height
    s = min(w, h) * rng.uniform(0.05, 0.08)
    # Props sit along the top and side edges, clear of most faces (they are painted over the figures).
    x = rng.choice([rng.uniform(s, w * 0.12 + s), rng.uniform(w * 0.88 - s, w - s), rng.uniform(s, w - s)])
    y = rng.uniform(s, h * 0.15 + s) if not (x < w * 0.15 or x > w * 0.85) else rng.uniform(s, h - s)
    shape = tag.rsplit("_", 1)[0] if tag[-1].isdigit() else tag
    line = _shade(colour, 0.6)
    if shape == "star_(symbol)":
        pts = [
            (
                x + s * (1 if i % 2 == 0 else 0.45) * math.sin(i * math.pi / 5),
                y - s * (1 if i % 2 == 0 else 0.45) * math.cos(i * math.pi / 5),
            )
            for i in range(10)
        ]
        d.polygon(pts, fill=colour, outline=line)
    elif shape == "heart":
        d.ellipse([x - s, y - s * 0.7, x, y + s * 0.2], fill=colour)
        d.ellipse([x, y - s * 0.7, x + s, y + s * 0.2], fill=colour)
        d.polygon([(x - s * 0.97, y - s * 0.1), (x + s * 0.97, y - s * 0.1), (x, y + s)], fill=colour)
    elif shape == "flower":
        for i in range(5):
            a = i * 2 * math.pi / 5
            px, py = x + s * 0.5 * math.cos(a), y + s * 0.5 * math.sin(a)
            d.ellipse([px - s * 0.4, py - s * 0.4, px + s * 0.4, py + s * 0.4], fill=colour)
        d.ellipse([x - s * 0.3, y - s * 0.3, x + s * 0.3, y + s * 0.3], fill=(255, 217, 61))
    elif shape == "crescent_moon":
        d.pieslice([x - s, y - s, x + s, y + s], 60, 300, fill=colour)
        d.ellipse([x - s * 0.35, y - s * 0.8, x + s * 1.1, y + s * 0.8], fill=colour, outline=line)
        d.pieslice([x - s, y - s, x + s, y + s], 300, 60, fill=line)
    elif shape == "musical_note":
        d.ellipse([x - s * 0.6, y + s * 0.3, x, y + s * 0.8], fill=colour)
        d.line([x - s * 0.05, y + s * 0.55, x - s * 0.05, y - s], fill=colour, width=max(2, int(s / 6)))
        d.line([x - s * 0.05, y - s, x + s * 0.5, y - s * 0.6], fill=colour, width=max(2, int(s / 6)))
    elif shape == "sparkle":
        d.polygon(
            [
                (x, y - s),
                (x + s * 0.2, y - s * 0.2),
                (x + s, y),
                (x + s * 0.2, y + s * 0.2),
                (x, y + s),
                (x - s * 0.2, y + s * 0.2),
                (x - s, y),
                (x - s * 0.2, y - s * 0.2),
            ],
            fill=colour,
        )
    elif shape == "cup":
        d.polygon(
            [
                (x - s * 0.6, y - s * 0.6),
                (x + s * 0.6, y - s * 0.6),
                (x + s * 0.45, y + s * 0.7),
                (x - s * 0.45, y + s * 0.7),
            ],
            fill=colour,
            outline=line,
        )
        d.arc([x + s * 0.3, y - s * 0.4, x + s * 0.95, y + s * 0.3], -90, 90, fill=line, width=max(2, int(s / 8)))
    elif shape == "book":
        d.rectangle(
            [x - s * 0.7, y - s * 0.9, x + s * 0.7, y + s * 0.9], fill=colour, outline=line, width=max(1, int(s / 10))
        )
        d.line([x - s * 0.45, y - s * 0.9, x - s * 0.45, y + s * 0.9], fill=line, width=max(1, int(s / 8)))
    else:
        raise ValueError(f"unknown prop {tag!r}")


def _figure(d: ImageDraw.ImageDraw, fig: Figure, cx: float, top: float, u: float, scene: Scene, out: Drawing) -> None:
    """Paint one character with its head `u` pixels tall, top of the head at `top`."""
    art = scene.artist
    lw = max(1, round(u * art.line_width / 300))
    ink = art.line_colour
    hair = HAIR_COLOURS[fig.hair]
    tags, main, trim = OUTFITS[fig.outfit]
    hy = top + u * 0.5  # head centre
    sw = u * (0.62 if fig.girl else 0.72)  # half shoulder width
    rating = scene.rating

    # Back hair and hood: behind everything else of the figure.
    _back_hair(d, fig.hairstyle, cx, hy, u, hair, ink, lw)
    out.drawn.add(fig.hair)
    out.drawn.update(HAIRSTYLES[fig.hairstyle])
    if fig.outfit == "hoodie" and rating != "e":
        d.ellipse(
            [cx - u * 0.62, hy - u * 0.45, cx + u * 0.62, hy + u * 0.75], fill=_shade(main, 0.85), outline=ink, width=lw
        )

    # Body: skin first, then as much outfit as the rating leaves on.
    sh, waist, hip, knee = hy + u * 0.68, hy + u * 2.0, hy + u * 2.8, hy + u * 4.5
    d.rectangle([cx - u * 0.12, hy + u * 0.35, cx + u * 0.12, sh + u * 0.1], fill=SKIN_SHADE)
    torso = [(cx - sw, sh), (cx + sw, sh), (cx + u * 0.42, waist), (cx - u * 0.42, waist)]
    d.polygon(torso, fill=SKIN, outline=ink, width=lw)
    for side in (-1, 1):
        d.polygon(
            [
                (cx + side * sw, sh),
                (cx + side * (sw + u * 0.22), sh + u * 0.1),
                (cx + side * (sw + u * 0.18), hy + u * 2.3),
                (cx + side * (sw - u * 0.02), hy + u * 2.3),
            ],
            fill=SKIN,
            outline=ink,
            width=lw,
        )
        d.rectangle(
            [cx + side * u * 0.28 - u * 0.14, hip, cx + side * u * 0.28 + u * 0.14, knee],
            fill=SKIN,
            outline=ink,
            width=lw,
        )
    d.polygon(
        [(cx - u * 0.42, waist), (cx + u * 0.42, waist), (cx + u * 0.48, hip), (cx - u * 0.48, hip)],
        fill=SKIN,
        outline=ink,
        width=lw,
    )
    if rating == "e":
        out.drawn.add("nude")
    else:
        _outfit(d, fig, cx, hy, u, sw, main, trim, ink, lw, rating)
        out.drawn.update(tags)
        if rating in ("s", "q"):
            out.drawn.add("bare_shoulders")
        if rating == "q":
            d.ellipse([cx - u * 0.03, hy + u * 1.75, cx + u * 0.03, hy + u * 1.82], fill=SKIN_SHADE)
            out.drawn.add("navel")

    # Head, face, front hair and accessories.
    if "animal_ears" in fig.accessories:
        for side in (-1, 1):
            x0 = cx + side * u * 0.3
            d.polygon(
                [(x0 - u * 0.14, hy - u * 0.35), (x0 + u * 0.14, hy - u * 0.35), (x0 + side * u * 0.1, hy - u * 0.8)],
                fill=hair,
                outline=ink,
                width=lw,
            )
        out.drawn.add("animal_ears")
    if "horns" in fig.accessories:
        for side in (-1, 1):
            x0 = cx + side * u * 0.22
            d.polygon(
                [(x0 - u * 0.07, hy - u * 0.4), (x0 + u * 0.07, hy - u * 0.4), (x0 + side * u * 0.16, hy - u * 0.72)],
                fill=HORN,
                outline=ink,
                width=lw,
            )
        out.drawn.add("horns")
    d.ellipse([cx - u * 0.42, hy - u * 0.5, cx + u * 0.42, hy + u * 0.5], fill=SKIN, outline=ink, width=lw)
    _face(d, fig, cx, hy, u, ink, lw, out)
    _fringe(d, fig.hairstyle, cx, hy, u, hair, ink, lw, art.shading)
    _accessories(d, fig, cx, hy, u, ink, lw, out)


def _back_hair(d, style: str, cx: float, hy: float, u: float, hair, ink, lw: int) -> None:
    length = {
        "long": 1.9,
        "very_long": 3.4,
        "twintails": 1.0,
        "ponytail": 1.0,
        "braid": 0.7,
        "short": 0.2,
        "bob": 0.7,
        "side_ponytail": 0.3,
    }[style]
    d.rounded_rectangle(
        [cx - u * 0.5, hy - u * 0.5, cx + u * 0.5, hy + u * length], radius=u * 0.3, fill=hair, outline=ink, width=lw
    )
    if style == "twintails":
        for side in (-1, 1):
            x0 = cx + side * u * 0.62
            d.ellipse([x0 - u * 0.22, hy - u * 0.3, x0 + u * 0.22, hy + u * 2.1], fill=hair, outline=ink, width=lw)
    elif style == "ponytail":
        d.ellipse([cx - u * 0.25, hy - u * 0.75, cx + u * 0.25, hy + u * 1.8], fill=hair, outline=ink, width=lw)
    elif style == "side_ponytail":
        d.ellipse([cx + u * 0.35, hy - u * 0.3, cx + u * 0.8, hy + u * 1.5], fill=hair, outline=ink, width=lw)
    elif style == "braid":
        for i in range(6):
            y = hy + u * (0.6 + i * 0.3)
            d.ellipse([cx + u * 0.3, y - u * 0.17, cx + u * 0.62, y + u * 0.17], fill=hair, outline=ink, width=lw)


def _fringe(d, style: str, cx: float, hy: float, u: float, hair, ink, lw: int, shading: str) -> None:
    d.chord([cx - u * 0.47, hy - u * 0.56, cx + u * 0.47, hy + u * 0.1], 180, 360, fill=hair, outline=ink, width=lw)
    for i in range(-2, 3):
        x = cx + i * u * 0.17
        d.polygon([(x - u * 0.1, hy - u * 0.24), (x + u * 0.1, hy - u * 0.24), (x, hy - u * 0.04)], fill=hair)
    if style in ("short", "bob"):
        for side in (-1, 1):
            d.polygon(
                [
                    (cx + side * u * 0.47, hy - u * 0.25),
                    (cx + side * u * 0.32, hy - u * 0.2),
                    (cx + side * u * 0.44, hy + u * (0.5 if style == "bob" else 0.2)),
                ],
                fill=hair,
            )
    if shading == "cel":
        d.chord([cx - u * 0.3, hy - u * 0.52, cx + u * 0.1, hy - u * 0.32], 180, 360, fill=_shade(hair, 0.8))
    elif shading == "soft":
        d.line(
            [cx + u * 0.05, hy - u * 0.48, cx + u * 0.25, hy - u * 0.35],
            fill=_mix(hair, WHITE, 0.5),
            width=max(1, round(u / 30)),
        )


def _face(d, fig: Figure, cx: float, hy: float, u: float, ink, lw: int, out: Drawing) -> None:
    iris = EYE_COLOURS[fig.eyes]
    ew, eh = max(3.0, u * 0.13), max(4.0, u * 0.17)
    for side in (-1, 1):
        ex, ey = cx + side * u * 0.19, hy + u * 0.06
        d.ellipse([ex - ew, ey - eh, ex + ew, ey + eh], fill=EYE_WHITE, outline=ink, width=max(1, lw // 2))
        d.ellipse([ex - ew * 0.8, ey - eh * 0.75, ex + ew * 0.8, ey + eh * 0.95], fill=iris)
        d.ellipse([ex - ew * 0.3, ey - eh * 0.2, ex + ew * 0.3, ey + eh * 0.4], fill=PUPIL)
        if fig.girl:  # lashes
            d.line([ex - ew * 1.2, ey - eh * 1.05, ex + ew * 1.2, ey - eh * 1.05], fill=ink, width=max(1, lw))
    out.drawn.add(fig.eyes)
    if "blush" in fig.expression:
        for side in (-1, 1):
            bx = cx + side * u * 0.27
            d.ellipse([bx - u * 0.08, hy + u * 0.2, bx + u * 0.08, hy + u * 0.27], fill=BLUSH)
        out.drawn.add("blush")
    my = hy + u * 0.33
    if "open_mouth" in fig.expression:
        d.ellipse(
            [cx - u * 0.07, my - u * 0.04, cx + u * 0.07, my + u * 0.08], fill=MOUTH, outline=ink, width=max(1, lw // 2)
        )
        out.drawn.add("open_mouth")
    if "smile" in fig.expression:
        d.arc([cx - u * 0.12, my - u * 0.1, cx + u * 0.12, my + u * 0.05], 20, 160, fill=ink, width=max(1, lw))
        out.drawn.add("smile")
    if not {"open_mouth", "smile"} & set(fig.expression):
        d.line([cx - u * 0.06, my, cx + u * 0.06, my], fill=ink, width=max(1, lw // 2))


def _outfit(d, fig: Figure, cx, hy, u, sw, main, trim, ink, lw: int, rating: str) -> None:
    sh, waist, hip = hy + u * 0.68, hy + u * 2.0, hy + u * 2.8
    # Coverage follows the rating: g covers shoulders and sleeves, s bares the shoulders, q the midriff too.
    chest = sh if rating == "g" else sh + u * 0.28
    bottom = waist if rating != "q" else waist - u * 0.55
    if fig.outfit == "swimsuit":
        d.polygon(
            [
                (cx - sw * 0.7, chest + u * 0.1),
                (cx + sw * 0.7, chest + u * 0.1),
                (cx + u * 0.45, hip - u * 0.3),
                (cx - u * 0.45, hip - u * 0.3),
            ],
            fill=main,
            outline=ink,
            width=lw,
        )
        return
    d.polygon(
        [(cx - sw, chest), (cx + sw, chest), (cx + u * 0.42, bottom), (cx - u * 0.42, bottom)],
        fill=main,
        outline=ink,
        width=lw,
    )
    if rating == "g":
        sleeve = u * (0.3 if fig.outfit == "kimono" else 0.22)
        for side in (-1, 1):
            d.polygon(
                [
                    (cx + side * sw, sh),
                    (cx + side * (sw + sleeve), sh + u * 0.1),
                    (cx + side * (sw + sleeve), hy + u * 1.5),
                    (cx + side * (sw - u * 0.03), hy + u * 1.5),
                ],
                fill=main,
                outline=ink,
                width=lw,
            )
    skirt = fig.girl and fig.outfit in ("school_uniform", "dress", "maid", "kimono")
    lower = main if fig.outfit != "school_uniform" else _shade(main, 0.8)
    if skirt:
        length = {"dress": 4.2, "kimono": 4.4, "maid": 3.6}.get(fig.outfit, 3.1)
        d.polygon(
            [
                (cx - u * 0.42, waist),
                (cx + u * 0.42, waist),
                (cx + u * 0.75, hy + u * length),
                (cx - u * 0.75, hy + u * length),
            ],
            fill=lower,
            outline=ink,
            width=lw,
        )
    elif fig.outfit != "armor" or rating == "g":
        for side in (-1, 1):
            d.rectangle(
                [cx + side * u * 0.28 - u * 0.16, waist, cx + side * u * 0.28 + u * 0.16, hy + u * 4.4],
                fill=lower,
                outline=ink,
                width=lw,
            )
    # The outfit's signature detail.
    if fig.outfit == "school_uniform":
        d.polygon(
            [(cx - sw * 0.8, chest), (cx + sw * 0.8, chest), (cx, chest + u * 0.5)], fill=trim, outline=ink, width=lw
        )
        d.polygon(
            [(cx - u * 0.1, chest + u * 0.4), (cx + u * 0.1, chest + u * 0.4), (cx, chest + u * 0.7)], fill=RIBBON
        )
    elif fig.outfit == "maid":
        d.rectangle([cx - u * 0.3, chest + u * 0.3, cx + u * 0.3, hy + u * 3.2], fill=trim, outline=ink, width=lw)
    elif fig.outfit == "kimono":
        d.rectangle(
            [cx - u * 0.44, waist - u * 0.35, cx + u * 0.44, waist - u * 0.05], fill=trim, outline=ink, width=lw
        )
    elif fig.outfit == "armor":
        for side in (-1, 1):
            d.ellipse(
                [cx + side * sw - u * 0.2, chest - u * 0.15, cx + side * sw + u * 0.2, chest + u * 0.25],
                fill=_shade(main, 0.8),
                outline=ink,
                width=lw,
            )
        d.rectangle([cx - u * 0.44, bottom - u * 0.12, cx + u * 0.44, bottom], fill=trim)
    elif fig.outfit == "dress":
        d.line([cx - u * 0.7, hy + u * 4.0, cx + u * 0.7, hy + u * 4.0], fill=trim, width=max(2, lw * 2))
    elif fig.outfit == "hoodie":
        d.line([cx - u * 0.1, chest + u * 0.05, cx - u * 0.1, chest + u * 0.6], fill=trim, width=max(1, lw))
        d.line([cx + u * 0.1, chest + u * 0.05, cx + u * 0.1, chest + u * 0.6], fill=trim, width=max(1, lw))
    elif fig.outfit == "suit":
        d.polygon(
            [(cx - u * 0.2, chest), (cx + u * 0.2, chest), (cx, chest + u * 0.8)], fill=trim, outline=ink, width=lw
        )
        d.polygon(
            [(cx - u * 0.05, chest + u * 0.1), (cx + u * 0.05, chest + u * 0.1), (cx, chest + u * 0.7)], fill=RIBBON
        )


def _accessories(d, fig: Figure, cx, hy, u, ink, lw: int, out: Drawing) -> None:
    acc = fig.accessories
    if "halo" in acc:
        d.ellipse(
            [cx - u * 0.35, hy - u * 0.92, cx + u * 0.35, hy - u * 0.74], outline=HALO, width=max(2, round(u / 18))
        )
        out.drawn.add("halo")
    if "hairband" in acc:
        d.arc(
            [cx - u * 0.46, hy - u * 0.55, cx + u * 0.46, hy + u * 0.2],
            195,
            345,
            fill=HAIRBAND,
            width=max(2, round(u / 14)),
        )
        out.drawn.add("hairband")
    if "hat" in acc:
        d.rectangle([cx - u * 0.38, hy - u * 0.95, cx + u * 0.38, hy - u * 0.42], fill=HAT, outline=ink, width=lw)
        d.ellipse([cx - u * 0.75, hy - u * 0.52, cx + u * 0.75, hy - u * 0.34], fill=HAT, outline=ink, width=lw)
        out.drawn.add("hat")
    if "hair_ribbon" in acc:
        x0, y0 = cx - u * 0.45, hy - u * 0.3
        d.polygon(
            [(x0, y0), (x0 - u * 0.25, y0 - u * 0.15), (x0 - u * 0.25, y0 + u * 0.15)],
            fill=RIBBON,
            outline=ink,
            width=max(1, lw // 2),
        )
        d.polygon(
            [(x0, y0), (x0 + u * 0.2, y0 - u * 0.15), (x0 + u * 0.2, y0 + u * 0.15)],
            fill=RIBBON,
            outline=ink,
            width=max(1, lw // 2),
        )
        out.drawn.add("hair_ribbon")
    if "hair_flower" in acc:
        x0, y0 = cx + u * 0.36, hy - u * 0.3
        for i in range(5):
            a = i * 2 * math.pi / 5
            px, py = x0 + u * 0.08 * math.cos(a), y0 + u * 0.08 * math.sin(a)
            d.ellipse([px - u * 0.06, py - u * 0.06, px + u * 0.06, py + u * 0.06], fill=FLOWER, outline=ink)
        out.drawn.add("hair_flower")
    if "glasses" in acc:
        gw = max(1, round(u / 25))
        for side in (-1, 1):
            ex, ey = cx + side * u * 0.19, hy + u * 0.06
            d.ellipse([ex - u * 0.16, ey - u * 0.14, ex + u * 0.16, ey + u * 0.14], outline=GLASSES, width=gw)
        d.line([cx - u * 0.03, hy + u * 0.04, cx + u * 0.03, hy + u * 0.04], fill=GLASSES, width=gw)
        out.drawn.add("glasses")
