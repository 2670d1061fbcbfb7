"""Tags where collections live: XMP sidecars, XMP and IPTC embedded in the image, and Hydrus's tag sidecars.

- `--format xmp`: `IMAGE.EXT.xmp` (digiKam's and darktable's name; `IMAGE.xmp`, Lightroom's, with `xmp_name="stem"`)
  holding every tag as a flat keyword (`dc:subject`), as `illust2vec|HEAD|NAME` (`lr:hierarchicalSubject`) and as
  `illust2vec/HEAD/NAME` (`digiKam:TagsList`). A sidecar that exists is merged: the user's keywords and other fields
  stay, the tags under `illust2vec` are replaced.
- `--format xmp --embed`: the same fields in the image's own XMP packet, and IPTC Keywords in a JPEG, for JPEG, PNG,
  WebP and TIFF; only the metadata is rewritten (exiv2 never decodes the pixels), in a copy that replaces the file.
- `--format hydrus`: `IMAGE.EXT.txt`, one tag per line, as Hydrus imports sidecars: `character:`, `series:`,
  `creator:`, `rating:`, `meta:` namespaces, general tags bare, spaces for underscores. A file that exists is merged.

XMP is read and written by exiv2 (through pyexiv2), never by string templates. Arrays are created with exiv2's
`type=Bag` / `type=Seq` values, then filled item by item, so each property has the type its schema gives it.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import UserError
from .captions import merge_caption, spelling
from .writers import KAOMOJIS, Record

ROOT = "illust2vec"  # the top of our keyword hierarchy: what this tool wrote is what lies under it
SUBJECT, HIERARCHY, TAGSLIST = "Xmp.dc.subject", "Xmp.lr.hierarchicalSubject", "Xmp.digiKam.TagsList"
ARRAYS = {SUBJECT: "Bag", HIERARCHY: "Bag", TAGSLIST: "Seq"}  # as dc, Lightroom's and digiKam's schemas type them
IPTC_KEYWORDS = "Iptc.Application2.Keywords"
IPTC_UTF8 = {"Iptc.Envelope.CharacterSet": "\x1b%G"}  # ISO 2022's "UTF-8", so readers decode the keywords as such
IPTC_MAX = 64  # bytes in one IPTC keyword (IIM 2:25); longer ones are in the XMP only
EMBED_FORMATS = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP", "TIFF": "TIFF"}  # Pillow's name -> ours
XMP_NAMES = ("ext", "stem")
# The order of keywords: fixed tags (--add), the rating, then heads as captions order them.
KEYWORD_HEADS = ("added", "rating", "character", "copyright", "artist", "general")
HYDRUS_NAMESPACES = {"character": "character", "copyright": "series", "artist": "creator", "rating": "rating"}
HYDRUS_NAMESPACES |= {"meta": "meta", "general": "", "added": ""}
# What exiv2 opens as a new, empty sidecar (it recognises an XMP file by its packet); exiv2 writes everything else.
EMPTY_PACKET = (
    '<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/"/><?xpacket end="w"?>'
)


class SidecarError(Exception):
    """One image's tags could not be written (read-only, a format without metadata, a broken sidecar): that image
    is reported and counted by `reason`, the rest go on."""

    def __init__(self, message: str, reason: str = "unwritable"):
        super().__init__(message)
        self.reason = reason


def _pyexiv2():
    try:
        import pyexiv2
    except ImportError:
        raise UserError("--format xmp needs pyexiv2: pip install 'illust2vec[collections]'") from None
    pyexiv2.set_log_level(3)  # exiv2's warnings on odd files would go to stdout; errors become exceptions
    return pyexiv2


# ---- what is written


def keywords(record: Record) -> list[tuple[str, str]]:
    """A record's tags as (head, name): fixed tags first, the top rating, then characters, copyrights, artists,
    general tags and any other head, each highest first; a name once per head."""
    out: list[tuple[str, str]] = []
    heads = [*KEYWORD_HEADS, *(h for h in record if h not in KEYWORD_HEADS and h != "path")]
    for head in heads:
        tags = list(record.get(head) or ())
        out.extend((head, t) for t in (tags[:1] if head == "rating" else tags))
    return list(dict.fromkeys(out))


def xmp_fields(record: Record) -> dict[str, list[str]]:
    """The three keyword properties of one image's tags (ours only)."""
    pairs = keywords(record)
    return {
        SUBJECT: list(dict.fromkeys(name for _, name in pairs)),
        HIERARCHY: [f"{ROOT}|{head}|{name}" for head, name in pairs],
        TAGSLIST: [f"{ROOT}/{head}/{name}" for head, name in pairs],
    }


def _ours(values: Iterable[str], sep: str) -> set[str]:
    """The names under our root in hierarchical keywords (`illust2vec|general|NAME` -> NAME)."""
    return {v.split(sep, 2)[2] for v in values if v.startswith(ROOT + sep) and v.count(sep) >= 2}


def merge_xmp(existing: dict[str, list[str]], ours: dict[str, list[str]]) -> dict[str, list[str]]:
    """A sidecar's keyword properties with ours in place of those this tool wrote before: hierarchical keywords
    under `illust2vec` are replaced, flat keywords named by them are dropped, everything else stays, in its order."""
    before = _ours(existing.get(HIERARCHY, ()), "|") | _ours(existing.get(TAGSLIST, ()), "/")
    out = {}
    for key, sep in ((SUBJECT, None), (HIERARCHY, "|"), (TAGSLIST, "/")):
        if sep is None:
            kept = [v for v in existing.get(key, ()) if v not in before]
        else:
            kept = [v for v in existing.get(key, ()) if not v.startswith(ROOT + sep)]
        out[key] = list(dict.fromkeys([*kept, *ours[key]]))
    return out


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _xmp_changes(fields: dict[str, list[str]]) -> dict[str, str | None]:
    """pyexiv2's modify_xmp argument setting each array whole: an empty array of the schema's type, then its items
    by index (a property with no items is removed)."""
    changes: dict[str, str | None] = {}
    for key, values in fields.items():
        if not values:
            changes[key] = None
            continue
        changes[key] = f"type={ARRAYS[key]}"
        changes.update({f"{key}[{i}]": v for i, v in enumerate(values, 1)})
    return changes


def _write_xmp(image, ours: dict[str, list[str]]) -> dict[str, list[str]]:
    """Merge our fields into an open pyexiv2 image (a sidecar, or an image file); returns what it now holds."""
    xmp = image.read_xmp()
    merged = merge_xmp({k: _as_list(xmp.get(k)) for k in ARRAYS}, ours)
    image.modify_xmp(_xmp_changes(merged))
    return merged


def _check_writable(path: Path) -> None:
    """A file whose write bits are all off is the user's way of saying "leave it" (root could write it anyway)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    if not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        raise SidecarError(f"{path.name} is read-only; not changed", "unwritable")


def _temp(path: Path) -> Path:
    return path.with_name(f".{path.name}.i2v.tmp")


# ---- XMP sidecars


def xmp_path(image: Path, name: str = "ext") -> Path:
    """IMAGE.EXT.xmp (digiKam, darktable) or, with name="stem", IMAGE.xmp (Lightroom)."""
    return image.with_name(image.name + ".xmp") if name == "ext" else image.with_suffix(".xmp")


def write_sidecar(image: Path, record: Record, name: str = "ext") -> Path:
    """Write (or merge into) the image's XMP sidecar: a copy is changed and renamed over it, so a crash never
    leaves half a sidecar. Raises SidecarError when it cannot be."""
    pyexiv2 = _pyexiv2()
    target = xmp_path(image, name)
    _check_writable(target)
    tmp = _temp(target)
    try:
        if target.exists():
            shutil.copy2(target, tmp)
        else:
            tmp.write_text(EMPTY_PACKET, encoding="utf-8")
        try:
            with pyexiv2.Image(str(tmp)) as sidecar:
                # exiv2 mirrors a sidecar's XMP as IPTC and, on writing, converts that IPTC back over dc:subject;
                # emptied, it converts nothing and the XMP is written as set here.
                sidecar.clear_iptc()
                _write_xmp(sidecar, xmp_fields(record))
        except RuntimeError as e:
            problem = _first_line(e)
            raise SidecarError(f"its sidecar {target.name} is not readable XMP ({problem}); not changed") from None
        os.replace(tmp, target)
    except OSError as e:
        raise SidecarError(f"cannot write {target.name} ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ---- embedded


def embed_format(path: Path) -> str | None:
    """The image's format if its file can carry XMP (JPEG, PNG, WebP, TIFF), else None (GIF, BMP...)."""
    try:
        with Image.open(path) as im:
            return EMBED_FORMATS.get(im.format or "")
    except (OSError, ValueError):
        return None


def embed(image: Path, record: Record, keep_mtime: bool = False) -> None:
    """Write the tags into the image's own XMP (and, in a JPEG, its IPTC Keywords), merged as in a sidecar.

    The metadata is rewritten in a copy, which then replaces the file (atomic: the file is whole before and after);
    the pixels' bytes are not touched. `keep_mtime` gives the new file the old one's modification time.
    Raises SidecarError for a format without metadata, a read-only file, or a file exiv2 cannot rewrite.
    """
    pyexiv2 = _pyexiv2()
    kind = embed_format(image)
    if kind is None:
        fmt = _format_name(image)
        raise SidecarError(f"a {fmt} file cannot carry XMP; not tagged (--format xmp writes a sidecar)", "unsupported")
    _check_writable(image)
    before = image.stat()
    tmp = _temp(image)
    try:
        shutil.copy2(image, tmp)
        try:
            with pyexiv2.Image(str(tmp)) as im:
                merged = _write_xmp(im, xmp_fields(record))
                if kind == "JPEG":
                    _write_iptc(im, merged[SUBJECT])
        except RuntimeError as e:
            raise SidecarError(f"exiv2 cannot rewrite its metadata ({_first_line(e)}); not changed") from None
        if keep_mtime:
            os.utime(tmp, ns=(before.st_atime_ns, before.st_mtime_ns))
        os.replace(tmp, image)
    except OSError as e:
        raise SidecarError(f"cannot rewrite it ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)


def _write_iptc(image, subject: Sequence[str]) -> None:
    """IPTC Keywords = the XMP's flat keywords (which keep the user's), as the Metadata Working Group asks."""
    fits = [k for k in subject if len(k.encode("utf-8")) <= IPTC_MAX]
    image.modify_iptc({**IPTC_UTF8, IPTC_KEYWORDS: fits or None})


def _format_name(path: Path) -> str:
    try:
        with Image.open(path) as im:
            return im.format or path.suffix.lstrip(".").upper()
    except (OSError, ValueError):
        return path.suffix.lstrip(".").upper() or "this"


# ---- Hydrus


def hydrus_path(image: Path) -> Path:
    """IMAGE.EXT.txt, the sidecar Hydrus's import folders read beside each file."""
    return image.with_name(image.name + ".txt")


def hydrus_tags(record: Record) -> list[str]:
    """One image's tags as Hydrus writes them: `namespace:tag` with spaces (general tags bare, kaomojis kept)."""
    out = []
    for head, name in keywords(record):
        text = name if spelling(name) in KAOMOJIS else name.replace("_", " ")
        space = HYDRUS_NAMESPACES.get(head, head)
        out.append(f"{space}:{text}" if space else text)
    return list(dict.fromkeys(out))


def write_lines(path: Path, ours: list[str], ours_before: Iterable[str], sep: str) -> tuple[str, ...]:
    """Merge our tags into a caption or tag sidecar (`sep` ", " for a caption, "\\n" for Hydrus): its tags stay,
    those this tool added before (`ours_before`) go, ours are added without duplicates; written whole under a
    temporary name and renamed. Returns the tags ours added (for the next merge)."""
    _check_writable(path)
    try:
        existing = path.read_text(encoding="utf-8") if path.exists() else ""
    except UnicodeDecodeError:
        raise SidecarError(f"{path.name} is not UTF-8 text; not changed") from None
    except OSError as e:
        raise SidecarError(f"cannot read {path.name} ({e.strerror or e})") from None
    theirs = [t for t in (existing.split("\n") if sep == "\n" else existing.replace("\n", ",").split(","))]
    merged = merge_caption(theirs, ours, ours_before)
    kept = {spelling(t) for t in merge_caption(theirs, (), ours_before)}
    tmp = _temp(path)
    try:
        tmp.write_text(sep.join(merged) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SidecarError(f"cannot write {path.name} ({e.strerror or e})") from None
    return tuple(t for t in ours if spelling(t) not in kept)


# ---- writers (infer.writers.Writer)


@dataclass(frozen=True)
class CollectionOptions:
    """`--xmp-name`, `--embed` and `--keep-mtime` of `i2v tag --format xmp`."""

    xmp_name: str = "ext"  # IMAGE.EXT.xmp; "stem": IMAGE.xmp
    embed: bool = False  # into the image itself (JPEG, PNG, WebP, TIFF)
    keep_mtime: bool = False  # --embed: the rewritten file keeps its modification time

    def __post_init__(self) -> None:
        if self.xmp_name not in XMP_NAMES:
            raise UserError(f"--xmp-name must be one of {', '.join(XMP_NAMES)}, not {self.xmp_name!r}")
        if self.keep_mtime and not self.embed:
            raise UserError("--keep-mtime is for --embed (a sidecar's time is its own)")

    def check(self, fmt: str) -> None:
        """UserError when an option is given for a format it does not apply to."""
        if fmt != "xmp" and (self.embed or self.xmp_name != "ext"):
            raise UserError(f"--embed and --xmp-name are for --format xmp, not {fmt}")


def open_collection_writer(
    fmt: str,
    options: CollectionOptions,
    append: bool = False,
    rating_first: bool = False,
    before: Callable[[Path], Iterable[str]] | None = None,
) -> XmpWriter | LinesWriter | None:
    """The writer of xmp, hydrus, or txt with --append; None for the formats of `writers.open_writer`."""
    if fmt == "xmp":
        return XmpWriter(options.xmp_name, options.embed, options.keep_mtime)
    if fmt == "hydrus" or (fmt == "txt" and append):
        return LinesWriter(fmt, rating_first, before)
    return None


def target_of(fmt: str, options: CollectionOptions) -> Callable[[Path], Path] | None:
    """The file written beside an image, for formats where two images could share one (a.png, a.jpg -> a.xmp)."""
    if fmt == "txt":
        from .writers import caption_path

        return caption_path
    if fmt == "xmp" and options.xmp_name == "stem" and not options.embed:
        return lambda image: xmp_path(image, "stem")
    return None


class XmpWriter:
    """`--format xmp`: a sidecar per image, or with `embed` the image's own metadata."""

    def __init__(self, name: str = "ext", embed: bool = False, keep_mtime: bool = False):
        if name not in XMP_NAMES:
            raise UserError(f"--xmp-name must be one of {', '.join(XMP_NAMES)}, not {name!r}")
        _pyexiv2()
        self.name, self.embed, self.keep_mtime = name, embed, keep_mtime
        self.added: tuple[str, ...] = ()

    def write(self, record: Record, image: Path) -> None:
        if self.embed:
            embed(image, record, self.keep_mtime)
        else:
            write_sidecar(image, record, self.name)

    def close(self) -> None:
        pass


class LinesWriter:
    """Tags merged into a file beside each image: Hydrus's `IMAGE.EXT.txt`, or with `--append` a caption.

    `before(image)` gives the tags this tool added to that file the last time (from the catalogue); `added` holds
    what the last `write` added, for the catalogue to keep."""

    def __init__(self, kind: str, rating_first: bool = False, before: Callable[[Path], Iterable[str]] | None = None):
        self.kind, self.rating_first = kind, rating_first
        self.before = before or (lambda image: ())
        self.added: tuple[str, ...] = ()

    def write(self, record: Record, image: Path) -> None:
        from .writers import SEPARATOR, caption, caption_path

        if self.kind == "hydrus":
            path, ours, sep = hydrus_path(image), hydrus_tags(record), "\n"
        else:
            path, ours, sep = caption_path(image), split_caption(caption(record, self.rating_first)), SEPARATOR
        self.added = write_lines(path, ours, self.before(image), sep)

    def close(self) -> None:
        pass


def split_caption(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]
