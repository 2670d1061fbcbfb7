"""The synthetic board's world: traits, characters, series and artists, deterministic from a seed.

Every visible trait has one tag and one exact RGB colour that nothing else in a picture uses, so a test
can check a tag against the pixels that were drawn. Trait colours have even channels; everything else
the renderer paints (skin, outfits, backgrounds, shading) has at least one odd channel.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..errors import UserError

# Trait tables: name -> RGB (all channels even, distinct across hair and eyes).
HAIR_COLOURS: dict[str, tuple[int, int, int]] = {
    "blonde_hair": (250, 220, 100),
    "brown_hair": (140, 90, 50),
    "black_hair": (40, 36, 44),
    "blue_hair": (60, 110, 230),
    "red_hair": (210, 40, 40),
    "pink_hair": (250, 150, 200),
    "purple_hair": (150, 90, 200),
    "green_hair": (70, 170, 80),
    "white_hair": (244, 244, 240),
    "grey_hair": (150, 150, 156),
    "orange_hair": (246, 140, 30),
    "aqua_hair": (80, 220, 210),
}
EYE_COLOURS: dict[str, tuple[int, int, int]] = {
    "blue_eyes": (30, 80, 200),
    "red_eyes": (190, 20, 30),
    "green_eyes": (20, 150, 60),
    "brown_eyes": (110, 60, 30),
    "purple_eyes": (120, 50, 170),
    "yellow_eyes": (230, 200, 20),
    "pink_eyes": (230, 100, 170),
    "aqua_eyes": (40, 200, 190),
    "orange_eyes": (230, 110, 10),
    "grey_eyes": (110, 110, 120),
}
# Hairstyle -> the tags it carries on a real board (twintails are long hair too).
HAIRSTYLES: dict[str, tuple[str, ...]] = {
    "long": ("long_hair",),
    "very_long": ("long_hair", "very_long_hair"),
    "short": ("short_hair",),
    "bob": ("short_hair", "bob_cut"),
    "twintails": ("long_hair", "twintails"),
    "ponytail": ("long_hair", "ponytail"),
    "braid": ("long_hair", "braid"),
    "side_ponytail": ("side_ponytail",),
}
ACCESSORIES = ("hat", "glasses", "hair_ribbon", "hairband", "hair_flower", "animal_ears", "horns", "halo")
# Outfit -> (tags, main colour, trim colour); colours have odd channels so they never match a trait.
OUTFITS: dict[str, tuple[tuple[str, ...], tuple[int, int, int], tuple[int, int, int]]] = {
    "school_uniform": (("school_uniform", "serafuku"), (33, 45, 91), (241, 241, 241)),
    "dress": (("dress",), (201, 73, 113), (253, 221, 231)),
    "maid": (("maid", "apron"), (25, 25, 31), (255, 255, 253)),
    "kimono": (("japanese_clothes", "kimono"), (177, 35, 51), (235, 191, 75)),
    "armor": (("armor",), (161, 165, 175), (105, 81, 41)),
    "swimsuit": (("swimsuit",), (41, 121, 207), (239, 239, 239)),
    "hoodie": (("hoodie",), (97, 155, 103), (57, 57, 61)),
    "suit": (("formal", "suit"), (45, 49, 65), (229, 229, 233)),
}
# Rating -> extra general tags; what is drawn follows the rating (how much of the outfit covers the figure).
RATING_TAGS: dict[str, tuple[str, ...]] = {
    "g": (),
    "s": ("bare_shoulders",),
    "q": ("bare_shoulders", "navel"),
    "e": ("nude",),
}
RATING_WEIGHTS = {"g": 0.55, "s": 0.28, "q": 0.11, "e": 0.06}
BACKGROUNDS: dict[str, tuple[str, ...]] = {
    "white": ("simple_background", "white_background"),
    "plain": ("simple_background",),
    "sky": ("outdoors", "sky", "cloud"),
    "field": ("outdoors",),
    "indoors": ("indoors",),
}
FRAMINGS = ("portrait", "upper_body", "cowboy_shot", "full_body")
EXPRESSIONS = ("smile", "open_mouth", "blush")
# Props drawn as small icons; the knob `props` takes the first N, cycling colours past the base list.
PROP_SHAPES = ("star_(symbol)", "heart", "flower", "crescent_moon", "musical_note", "sparkle", "cup", "book")
SKIN = (255, 225, 199)
SKIN_SHADE = (233, 187, 163)

SYLLABLES = (
    "ka",
    "ki",
    "ku",
    "ke",
    "ko",
    "sa",
    "shi",
    "su",
    "se",
    "so",
    "ta",
    "chi",
    "tsu",
    "te",
    "to",
    "na",
    "ni",
    "nu",
    "ne",
    "no",
    "ha",
    "hi",
    "fu",
    "he",
    "ho",
    "ma",
    "mi",
    "mu",
    "me",
    "mo",
    "ya",
    "yu",
    "yo",
    "ra",
    "ri",
    "ru",
    "re",
    "ro",
    "wa",
    "n",
)


FRACTIONS = (
    "label_noise",
    "original_fraction",
    "deleted_fraction",
    "banned_fraction",
    "non_image_fraction",
    "child_fraction",
)


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the synthetic board; tests make tiny sets, benchmarks big hard ones."""

    seed: int = 0
    posts: int = 2000
    characters: int = 40
    series: int = 8
    artists: int = 12
    props: int = 4
    label_noise: float = 0.03  # chance that a true general tag is missing from a post, as taggers on a board forget
    pixel_noise: float = 0.0  # std of Gaussian pixel noise, in 0..255 units
    original_fraction: float = 0.12  # posts whose characters are original (copyright "original", no character tag)
    zipf: float = 1.1  # long tail: character k is drawn with weight 1 / k**zipf
    min_size: int = 300
    max_size: int = 2000
    deleted_fraction: float = 0.02
    banned_fraction: float = 0.01
    non_image_fraction: float = 0.01
    child_fraction: float = 0.05  # posts that are variants of an earlier post (parent_id set)

    def __post_init__(self) -> None:
        for name in ("posts", "characters", "series", "props"):
            if getattr(self, name) < 0:
                raise UserError(f"SynthConfig.{name} must not be negative, not {getattr(self, name)}")
        if self.artists < 1:
            raise UserError(f"SynthConfig.artists must be at least 1, not {self.artists}")
        if self.characters and not self.series:
            raise UserError(f"SynthConfig.series must be at least 1 for {self.characters} characters, not 0")
        for name in FRACTIONS:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"SynthConfig.{name} must be between 0 and 1, not {getattr(self, name)}")
        if self.pixel_noise < 0:
            raise UserError(f"SynthConfig.pixel_noise must not be negative, not {self.pixel_noise}")
        if self.min_size < 1:
            raise UserError(f"SynthConfig.min_size must be at least 1, not {self.min_size}")
        if self.min_size > self.max_size:
            raise UserError(f"SynthConfig.min_size {self.min_size} is larger than max_size {self.max_size}")


@dataclass(frozen=True)
class Series:
    name: str
    palette: tuple[tuple[int, int, int], ...]  # background colours (odd channels)
    background: str  # preferred background style


@dataclass(frozen=True)
class Character:
    name: str
    series: str
    girl: bool
    hair: str
    eyes: str
    hairstyle: str
    accessories: tuple[str, ...]
    outfit: str

    def tags(self) -> list[str]:
        """General tags that this character's visible traits carry."""
        return [self.hair, self.eyes, *HAIRSTYLES[self.hairstyle], *self.accessories, *OUTFITS[self.outfit][0]]


@dataclass(frozen=True)
class Artist:
    name: str
    line_width: float  # relative to figure height, in thousandths
    line_colour: tuple[int, int, int]
    shading: str  # flat, cel or soft
    saturation: float


@dataclass(frozen=True)
class World:
    config: SynthConfig
    series: tuple[Series, ...]
    characters: tuple[Character, ...]
    artists: tuple[Artist, ...]
    props: tuple[tuple[str, tuple[int, int, int]], ...] = field(default=())

    @property
    def character_weights(self) -> list[float]:
        return [1.0 / (k + 1) ** self.config.zipf for k in range(len(self.characters))]


def _odd(c: tuple[int, int, int]) -> tuple[int, int, int]:
    return (c[0] | 1, c[1] | 1, c[2] | 1)


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts))


def _unique(rng: random.Random, taken: set[str], make) -> str:
    while True:
        name = make(rng)
        if name not in taken:
            taken.add(name)
            return name


def make_world(cfg: SynthConfig) -> World:
    """Build the cast from the config's seed: same seed, same world."""
    rng = random.Random(f"world-{cfg.seed}")
    taken: set[str] = set()
    series = []
    styles = list(BACKGROUNDS)
    for i in range(cfg.series):
        name = _unique(
            rng,
            taken,
            lambda r: f"{_name(r, 3)}_{r.choice(['gakuen', 'monogatari', 'fantasy', 'project', 'no_uta', 'quest'])}",
        )
        palette = tuple(_odd(tuple(rng.randrange(40, 256) for _ in range(3))) for _ in range(3))
        series.append(Series(name=name, palette=palette, background=styles[i % len(styles)]))

    characters = []
    combos: set[tuple] = set()
    for _ in range(cfg.characters):
        while True:
            traits = (
                rng.choice(list(HAIR_COLOURS)),
                rng.choice(list(EYE_COLOURS)),
                rng.choice(list(HAIRSTYLES)),
                rng.choice(list(OUTFITS)),
            )
            if traits not in combos or len(combos) >= 10_000:
                combos.add(traits)
                break
        n_acc = rng.choices([0, 1, 2], weights=[0.35, 0.45, 0.2])[0]
        accessories = tuple(sorted(rng.sample(ACCESSORIES, n_acc)))
        s = rng.choice(series)
        given, family = _name(rng, 2), _name(rng, 3)
        name = _unique(
            rng, taken, lambda r, g=given, f=family: f"{f}_{g}" if f"{f}_{g}" not in taken else f"{f}_{g}{_name(r, 1)}"
        )
        characters.append(
            Character(
                name=name,
                series=s.name,
                girl=rng.random() < 0.85,
                hair=traits[0],
                eyes=traits[1],
                hairstyle=traits[2],
                accessories=accessories,
                outfit=traits[3],
            )
        )

    artists = []
    for _ in range(cfg.artists):
        artists.append(
            Artist(
                name=_unique(rng, taken, lambda r: _name(r, 2) + rng.choice(["", "_(artist)", "ya", "dou"])),
                line_width=rng.uniform(2.0, 9.0),
                line_colour=_odd(rng.choice([(20, 20, 20), (60, 35, 25), (25, 35, 70), (70, 30, 60)])),
                shading=rng.choice(["flat", "cel", "soft"]),
                saturation=rng.uniform(0.75, 1.15),
            )
        )

    props = []
    prop_colours = [(203, 51, 53), (255, 207, 63), (65, 133, 223), (131, 203, 81), (211, 105, 219), (251, 151, 71)]
    for i in range(cfg.props):
        shape = PROP_SHAPES[i % len(PROP_SHAPES)]
        tag = shape if i < len(PROP_SHAPES) else f"{shape}_{i // len(PROP_SHAPES)}"
        props.append((tag, prop_colours[i % len(prop_colours)]))
    return World(cfg, tuple(series), tuple(characters), tuple(artists), tuple(props))


def all_general_tags(world: World) -> list[str]:
    """Every general tag the board can carry (the generator's vocabulary)."""
    tags: list[str] = [*HAIR_COLOURS, *EYE_COLOURS]
    for group in HAIRSTYLES.values():
        tags += group
    tags += ACCESSORIES
    for group, _, _ in OUTFITS.values():
        tags += group
    for group in RATING_TAGS.values():
        tags += group
    for group in BACKGROUNDS.values():
        tags += group
    tags += ["transparent_background", *FRAMINGS, *EXPRESSIONS, "solo", "multiple_girls", "multiple_boys"]
    tags += ["1girl", "2girls", "3girls", "1boy", "2boys", "3boys"]
    tags += [tag for tag, _ in world.props]
    return list(dict.fromkeys(tags))
