"""Tag categories: Danbooru's codes, which selected_tags.csv uses, and the order of the heads. Defined here only."""

GENERAL, ARTIST, COPYRIGHT, CHARACTER, META, RATING = 0, 1, 3, 4, 5, 9
CATEGORY_CODES = {"general": GENERAL, "artist": ARTIST, "copyright": COPYRIGHT, "character": CHARACTER, "meta": META}
CATEGORY_CODES["rating"] = RATING
CATEGORY_NAMES = {code: name for name, code in CATEGORY_CODES.items()}
# The categories a post's tag string is split into (the posts table's tags_* columns).
POST_CATEGORIES = ("general", "character", "copyright", "artist", "meta")
# WD's order of the rows and heads: rating, general, character, then the rest.
HEAD_ORDER = ("rating", "general", "character", "copyright", "artist")
RATING_TAGS = {"g": "general", "s": "sensitive", "q": "questionable", "e": "explicit"}  # post rating -> WD rating tag
RATING_IDS = {"general": 9999999, "sensitive": 9999998, "questionable": 9999997, "explicit": 9999996}  # WD's
