"""Image boards as data (endpoints, paging, field names, limits, polite rates) and their answers as `Post`s."""

from __future__ import annotations

import hashlib
import html
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from ..errors import UserError
from ..formats.categories import ARTIST, CATEGORY_CODES, CHARACTER, COPYRIGHT, GENERAL, META, POST_CATEGORIES
from ..formats.posts import make_row

RATINGS = ("g", "s", "q", "e")  # Danbooru's codes; every site maps onto them
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "avif")
# The tag categories a post's tags split into (Danbooru's codes, which selected_tags.csv uses).
POST_CATEGORY_NAMES = {CATEGORY_CODES[name]: name for name in POST_CATEGORIES}
ENV_LOGIN, ENV_API_KEY = "I2V_LOGIN", "I2V_API_KEY"


@dataclass(frozen=True)
class Post:
    """One post, normalised across sites: the columns of posts/*.parquet (DESIGN.md) minus status."""

    id: int
    md5: str | None  # None when the board hides the file (deleted, banned, restricted)
    file_url: str | None  # the original file (never a sample), absolute; None when hidden
    file_ext: str  # lower case, no dot; "" if unknown
    width: int
    height: int
    rating: str  # one of RATINGS, "" if unknown
    score: int
    created_at: datetime | None  # timezone-aware, in UTC
    tags_general: tuple[str, ...]
    tags_character: tuple[str, ...]
    tags_copyright: tuple[str, ...]
    tags_artist: tuple[str, ...]
    tags_meta: tuple[str, ...]
    site: str  # a key of SITES
    parent_id: int | None
    source: str = ""

    @property
    def has_file(self) -> bool:
        """Whether the board shows the file, so that it can be downloaded and checked."""
        return bool(self.md5 and self.file_url)

    @property
    def is_image(self) -> bool:
        """Whether the file is a still or animated picture (not a video, ugoira zip or flash)."""
        return self.file_ext in IMAGE_EXTS


def post_record(post: Post, status: str, reason: str = "", shard: str | None = None) -> dict:
    """The post as one row of the posts table (formats/posts.py)."""
    return make_row(asdict(post), status, reason, shard)


@dataclass(frozen=True)
class Site:
    """What differs between boards, as data: endpoints, paging, field names, limits, polite defaults.

    `id_range` and the values of `page_params` are format strings over {low}, {below}, {last} (below - 1) and
    {before} (low - 1): the search terms and parameters that ask for low <= id < below, newest first.
    """

    name: str
    page_limit: int  # most posts one page can hold
    api_rate: float  # default requests/s for the API
    file_rate: float  # default requests/s for files
    flat_tags: bool  # posts carry one flat tag string; categories come from a tag endpoint
    posts_path: str
    id_range: str
    page_params: Mapping[str, str]
    ratings: Mapping[str, str]  # the site's rating words -> RATINGS
    auth_keys: tuple[str, str]  # query parameters for Auth.login and Auth.api_key
    width_key: str = "width"
    height_key: str = "height"
    html_escaped: bool = False  # tags and sources arrive HTML-escaped (Gelbooru)
    tag_path: str = ""  # the tag endpoint of a flat-tag site
    tag_params: Mapping[str, str] = field(default_factory=dict)
    tag_batch: int = 0  # tag names per request; 0: one request answers for every tag (fetch it once, keep all)
    tag_types: Mapping[int, int] = field(default_factory=dict)  # the site's tag type -> Danbooru category
    host_tag_types: Mapping[str, Mapping[int, int]] = field(default_factory=dict)  # overrides by host name


# Moebooru's own deployment, yande.re, adds type 5 "circle" and 6 "faults" to the four it shares with Danbooru.
# Danbooru tags doujin circles as artists and puts scan and compression faults (jpeg_artifacts, scan) in meta.
_YANDERE_TYPES = {0: GENERAL, 1: ARTIST, 3: COPYRIGHT, 4: CHARACTER, 5: ARTIST, 6: META}
# Konachan names its extra types "style" and "circle" instead. The numbers (style 5, circle 6) are inferred from
# its tag pages, not read from its source: style goes to meta (medium and technique, never content), circle to artist.
_KONACHAN_TYPES = {0: GENERAL, 1: ARTIST, 3: COPYRIGHT, 4: CHARACTER, 5: META, 6: ARTIST}

# Rates. Danbooru's help:api sets a hard limit of 10 requests/s but asks scrapers to stay near 1/s, and its
# Cloudflare front end blocks bursts and bans the IP ranges of aggressive crawlers (gallery-dl #9705, waifuc #22).
# Gelbooru publishes no figure; rule34.xxx, on the same Gelbooru 0.2 code, allows 60 API requests a minute
# (imgbrd-grabber #3641). Moebooru sites (yande.re, konachan) publish none either. So 1 API request/s everywhere.
# Files come from CDN hosts (cdn.donmai.us, img3.gelbooru.com, files.yande.re) that cache them; 2/s stays five
# times under Danbooru's hard limit while a crawl of a million images still ends in about a week.
SITES: dict[str, Site] = {
    "danbooru": Site(
        name="danbooru",
        page_limit=200,
        api_rate=1.0,
        file_rate=2.0,
        flat_tags=False,
        posts_path="/posts.json",
        # page=b<id> seeks below an id whatever the depth; id: is a metatag, free of the 2-tag limit.
        id_range="id:>={low}",
        page_params={"page": "b{below}"},
        ratings={r: r for r in RATINGS},
        auth_keys=("login", "api_key"),
        width_key="image_width",
        height_key="image_height",
    ),
    "moebooru": Site(
        name="moebooru",
        page_limit=100,  # the hard limit in yande.re's API help (newer Moebooru code allows 1000)
        api_rate=1.0,
        file_rate=2.0,
        flat_tags=True,
        posts_path="/post.json",
        # Moebooru keeps one id: term per search, so the range is A..B (inclusive); deep numbered pages are slow.
        id_range="id:{low}..{last} order:id_desc",
        page_params={},
        # Moebooru never split "safe" as Danbooru did in 2022, when Danbooru's safe posts became general (g) and
        # sensitive (s) was carved out of them. A safe that was never split is closest to g, the bulk of it.
        ratings={"s": "g", "safe": "g", "q": "q", "questionable": "q", "e": "e", "explicit": "e"},
        auth_keys=("login", "password_hash"),  # the key is the SHA-1 password hash: see moebooru_password_hash
        # /tag.json?name= matches substrings (name=book also finds notebook), one name per request; limit=0 answers
        # every tag of the board in one request, which a crawl needs once.
        tag_path="/tag.json",
        tag_params={"limit": "0"},
        tag_batch=0,
        tag_types=_YANDERE_TYPES,
        host_tag_types={"konachan.com": _KONACHAN_TYPES, "konachan.net": _KONACHAN_TYPES},
    ),
    "gelbooru": Site(
        name="gelbooru",
        page_limit=100,
        api_rate=1.0,
        file_rate=2.0,
        flat_tags=True,
        posts_path="/index.php",
        # Strict < and > are the comparisons every Gelbooru 0.2 site accepts (gallery-dl pages with id:<N);
        # pid stays 0, since Gelbooru refuses to page deep ("Unable to search this deep").
        id_range="id:>{before} id:<{below} sort:id:desc",
        page_params={"page": "dapi", "s": "post", "q": "index", "json": "1", "pid": "0"},
        # Words since Gelbooru followed Danbooru's split in 2022; safe and the letters before that (see moebooru).
        ratings={"general": "g", "sensitive": "s", "questionable": "q", "explicit": "e"}
        | {"safe": "g", "s": "g", "q": "q", "e": "e"},
        auth_keys=("user_id", "api_key"),  # Auth.login holds the numeric user id from the account's options page
        html_escaped=True,
        tag_path="/index.php",
        tag_params={"page": "dapi", "s": "tag", "q": "index", "json": "1"},
        tag_batch=100,  # names= takes a space-separated list; 100 names keep the URL near 3 kB
        # 5 is "metadata"; 6 "deprecated" tags have lost their category, and general is the default one.
        tag_types={0: GENERAL, 1: ARTIST, 3: COPYRIGHT, 4: CHARACTER, 5: META, 6: GENERAL},
    ),
}


# Requests


@dataclass(frozen=True)
class Auth:
    """A board account: login (Gelbooru: the user id) and API key (Moebooru: the password hash)."""

    login: str
    api_key: str = field(repr=False)

    def __repr__(self) -> str:
        return f"Auth(login={self.login!r}, api_key=***)"


def auth_params(site: Site, auth: Auth | None) -> dict[str, str]:
    """The query parameters that sign a request to `site` with `auth` (none without)."""
    if auth is None:
        return {}
    login_key, key_key = site.auth_keys
    return {login_key: auth.login, key_key: auth.api_key}


def moebooru_password_hash(password: str, salt: str = "choujin-steiner") -> str:
    """The `password_hash` a Moebooru site takes in place of a password: SHA-1 of "<salt>--<password>--"."""
    return hashlib.sha1(f"{salt}--{password}--".encode()).hexdigest()


def page_request(
    site: Site,
    base_url: str,
    *,
    low: int,
    below: int,
    query: str = "",
    limit: int | None = None,
    auth: Auth | None = None,
) -> tuple[str, dict[str, str]]:
    """URL and query params for the page of posts with low <= id < below, newest first, at most `limit`.

    `limit` defaults to, and is capped at, `site.page_limit`. `query` (the user's tags) follows the id range.
    """
    if below <= low:
        raise ValueError(f"empty id range: {low} <= id < {below}")
    values = {"low": low, "below": below, "last": below - 1, "before": low - 1}
    limit = site.page_limit if limit is None else max(1, min(limit, site.page_limit))
    tags = " ".join(part for part in (site.id_range.format(**values), query.strip()) if part)
    params = {key: value.format(**values) for key, value in site.page_params.items()}
    params.update(tags=tags, limit=str(limit), **auth_params(site, auth))
    return base_url.rstrip("/") + site.posts_path, params


def tag_requests(
    site: Site, base_url: str, names: Sequence[str], auth: Auth | None = None
) -> list[tuple[str, dict[str, str]]]:
    """Requests that look up the categories of these tag names on a flat-tag site; empty for Danbooru.

    With `site.tag_batch` 0 (Moebooru) the one request answers for every tag on the board, whatever `names`:
    keep all of its answer, not just `names`, and ask again only for tags created since.
    """
    names = list(dict.fromkeys(n for n in names if n))
    if not site.tag_path or not names:
        return []
    url = base_url.rstrip("/") + site.tag_path
    params = {**site.tag_params, **auth_params(site, auth)}
    if site.tag_batch == 0:
        return [(url, params)]
    if site.html_escaped:  # Gelbooru stores names as its posts show them, escaped
        names = [_php_escape(n) for n in names]
    return [
        (url, {**params, "names": " ".join(batch), "limit": str(len(batch))})
        for batch in (names[i : i + site.tag_batch] for i in range(0, len(names), site.tag_batch))
    ]


# Answers


def parse_page(site: Site, payload: Any) -> list[dict]:
    """The raw post objects in a decoded JSON page; ValueError on a payload of the wrong shape (an error object)."""
    posts = _unwrap(site, payload, "post", "posts")
    for raw in posts:
        if not isinstance(raw, dict) or "id" not in raw:
            raise ValueError(f"{site.name}: a post in the page is not an object with an id: {str(raw)[:100]}")
    return posts


def parse_tags(site: Site, payload: Any, *, base_url: str = "") -> dict[str, int]:
    """Tag name -> Danbooru category code from a decoded tag response (Danbooru's /tags.json too).

    Types the site has and Danbooru has not are mapped by `site.tag_types` (by `site.host_tag_types` for the host
    of `base_url`, when it has its own); unknown types go to general.
    """
    types = site.host_tag_types.get(urlsplit(base_url).hostname or "", site.tag_types)
    found: dict[str, int] = {}
    for item in _unwrap(site, payload, "tag", "tags"):
        if not isinstance(item, dict) or "name" not in item:
            raise ValueError(f"{site.name}: a tag in the answer is not an object with a name: {str(item)[:100]}")
        name = html.unescape(str(item["name"])) if site.html_escaped else str(item["name"])
        # Danbooru answers with its own codes (category); the others with theirs (type).
        code = _int(item["category"]) if "category" in item else types.get(_int(item.get("type")), GENERAL)
        found[name] = code if code in POST_CATEGORY_NAMES else GENERAL
    return found


def flat_tags(site: Site, raw: dict) -> tuple[str, ...]:
    """Every tag name of a raw post, unescaped, in the board's order (Danbooru's tag_string, others' tags)."""
    names = str(raw.get("tags") or raw.get("tag_string") or "").split()
    if site.html_escaped:
        names = [html.unescape(n) for n in names]
    return tuple(dict.fromkeys(names))


def to_post(site: Site, raw: dict, categories: Mapping[str, int] | None = None, *, base_url: str = "") -> Post:
    """Normalise one raw post.

    For flat-tag sites `categories` maps tag name -> Danbooru category code; unknown tags go to general.
    A file the board hides (Danbooru: is_deleted, is_banned, or no md5 and file_url keys; the others: status
    "deleted") leaves md5 and file_url None. Relative file URLs (old Danbooru's /data/..., or //host/...) are
    made absolute against `base_url`.
    """
    hidden = bool(raw.get("is_deleted") or raw.get("is_banned") or raw.get("status") == "deleted")
    md5 = None if hidden else (str(raw.get("md5") or "") or None)
    file_url = None if hidden else _absolute(raw.get("file_url"), base_url)
    file_ext = str(raw.get("file_ext") or "").lower() or _ext(raw.get("image")) or _ext(raw.get("file_url"))
    source = str(raw.get("source") or "")
    return Post(
        id=int(raw["id"]),
        md5=md5,
        file_url=file_url,
        file_ext=file_ext,
        width=_int(raw.get(site.width_key, raw.get("width"))),
        height=_int(raw.get(site.height_key, raw.get("height"))),
        rating=site.ratings.get(str(raw.get("rating") or "").lower(), ""),
        score=_int(raw.get("score")),
        created_at=parse_time(raw.get("created_at")),
        **_split_tags(site, raw, categories or {}),
        site=site.name,
        parent_id=_int(raw.get("parent_id")) or None,  # Gelbooru writes 0 for none
        source=html.unescape(source) if site.html_escaped else source,
    )


def _split_tags(site: Site, raw: dict, categories: Mapping[str, int]) -> dict[str, tuple[str, ...]]:
    if any(f"tag_string_{name}" in raw for name in POST_CATEGORY_NAMES.values()):  # Danbooru splits them itself
        return {
            f"tags_{name}": tuple(str(raw.get(f"tag_string_{name}") or "").split())
            for name in POST_CATEGORY_NAMES.values()
        }
    groups: dict[str, list[str]] = {name: [] for name in POST_CATEGORY_NAMES.values()}
    for tag in flat_tags(site, raw):
        groups[POST_CATEGORY_NAMES.get(categories.get(tag, GENERAL), "general")].append(tag)
    return {f"tags_{name}": tuple(tags) for name, tags in groups.items()}


def _unwrap(site: Site, payload: Any, key: str, plural: str) -> list:
    """The list in an answer: a bare list, Gelbooru's {"@attributes", key: [...]}, or {plural: [...]}."""
    if isinstance(payload, list):
        return payload
    if isinstance(payload, dict):
        if payload.get("success") is False or not ({"@attributes", key, plural} & payload.keys()):
            message = payload.get("message") or payload.get("reason") or payload.get("error") or str(payload)[:200]
            raise ValueError(f"{site.name} answered an error instead of a list: {message}")
        items = payload.get(key, payload.get(plural, []))
        # Gelbooru leaves the key out of an empty answer and, on some versions, gives one item bare.
        return [items] if isinstance(items, dict) else items if isinstance(items, list) else []
    raise ValueError(f"{site.name} answered {type(payload).__name__}, not a list or an object")


def _php_escape(name: str) -> str:
    # PHP's htmlspecialchars with ENT_QUOTES, as Gelbooru's stored tags show it (rubik&#039;s_cube, &gt;_&lt;).
    return html.escape(name, quote=True).replace("&#x27;", "&#039;")


def _absolute(url: Any, base_url: str) -> str | None:
    if not url:
        return None
    url = str(url)
    if url.startswith("//") and not base_url:
        return "https:" + url
    return urljoin(base_url, url) if base_url else url


def _ext(url: Any) -> str:
    name = urlsplit(str(url or "")).path.rsplit("/", 1)[-1]
    ext = name.rpartition(".")[2].lower() if "." in name else ""
    return ext if re.fullmatch(r"[a-z0-9]{1,5}", ext) else ""


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0  # absent, null, or "" (Gelbooru 0.2 sites send score="")


_MONTH_NAMES = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTHS = {m: i for i, m in enumerate(_MONTH_NAMES, 1)}
_GELBOORU_TIME = re.compile(r"\w{3} (\w{3}) +(\d{1,2}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d) (\d{4})")


def parse_time(value: Any) -> datetime | None:
    """A board's timestamp as an aware UTC datetime, or None when absent or unreadable.

    Danbooru: ISO 8601 with an offset; Moebooru: unix seconds (Danbooru 1: {"s": seconds, "n": nanoseconds});
    Gelbooru: "Mon Mar 13 19:00:33 -0500 2023" (read without the locale, which strptime's %a and %b depend on).
    """
    if isinstance(value, dict) and "s" in value:
        value = _int(value["s"]) + _int(value.get("n")) / 1e9
    if isinstance(value, bool) or value is None or value == "":
        return None
    if isinstance(value, int | float) or (isinstance(value, str) and value.isdigit()):
        return datetime.fromtimestamp(float(value), UTC)
    text = str(value).strip()
    if m := _GELBOORU_TIME.fullmatch(text):
        month, day, hh, mm, ss, sign, oh, om, year = m.groups()
        if month not in _MONTHS:
            return None
        offset = timedelta(hours=int(oh), minutes=int(om)) * (-1 if sign == "-" else 1)
        local = datetime(int(year), _MONTHS[month], int(day), int(hh), int(mm), int(ss), tzinfo=timezone(offset))
        return local.astimezone(UTC)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)


# Credentials


def load_auth(
    login: str | None,
    api_key: str | None,
    env: Mapping[str, str] = os.environ,
    key_file: Path | None = None,
) -> Auth | None:
    """Credentials from flags, else the environment (I2V_LOGIN, I2V_API_KEY), else a key file; None if none.

    The key file holds `login:api_key` on its first line, or the login and the key on two lines. Half a pair
    anywhere, or a key file that cannot be read, is a UserError with one clear line. The key is never logged.
    """
    login, api_key = (login or "").strip(), (api_key or "").strip()
    if login or api_key:
        return _pair(login, api_key, "--login and --api-key")
    login, api_key = env.get(ENV_LOGIN, "").strip(), env.get(ENV_API_KEY, "").strip()
    if login or api_key:
        return _pair(login, api_key, f"{ENV_LOGIN} and {ENV_API_KEY}")
    if key_file is None:
        return None
    try:
        lines = [line.strip() for line in Path(key_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the key file {key_file}: {getattr(e, 'strerror', None) or e}") from None
    if lines and ":" in lines[0]:
        login, _, api_key = lines[0].partition(":")
    elif len(lines) >= 2:
        login, api_key = lines[0], lines[1]
    else:
        login, api_key = "", ""
    if not (login.strip() and api_key.strip()):
        raise UserError(f"the key file {key_file} must hold login:api_key on its first line, or login and key on two")
    return Auth(login.strip(), api_key.strip())


def _pair(login: str, api_key: str, what: str) -> Auth:
    if not (login and api_key):
        missing = "the API key" if login else "the login"
        raise UserError(f"{what} go together: {missing} is missing")
    return Auth(login, api_key)
