"""Caption rules on their own: exclusions in either spelling and with wildcards, replacements that merge, the
highest-scoring N, the --replace forms, and merging into a caption file that exists."""

import pytest

from illust2vec.errors import UserError
from illust2vec.infer.captions import CaptionRules, merge_caption, parse_replace, spelling, split_tags

TAGS = {
    "rating": {"general": 0.9, "sensitive": 0.1},
    "general": {"long_hair": 0.95, "simple_background": 0.9, "white_background": 0.8, "completely_nude": 0.7,
                "nude": 0.6, "smile": 0.5},
    "character": {"hatsune_miku": 0.99},
}  # fmt: skip


def test_spelling_either_way():
    assert spelling(" long hair ") == spelling("long_hair") == "long_hair"
    assert spelling("yuuki \\(sao\\)") == "yuuki_(sao)"
    assert split_tags(" a, b ,,c ") == ("a", "b", "c") and split_tags(None) == ()


def test_exclude_either_spelling_and_wildcards():
    rules = CaptionRules(exclude=("long hair", "*_background"))
    out = rules.apply(TAGS)
    assert list(out["general"]) == ["completely_nude", "nude", "smile"]
    assert out["character"] == TAGS["character"] and out["rating"] == TAGS["rating"]
    assert rules.exact_excludes == {"long_hair"}
    # a wildcard matches whole names only, and "*" alone matches everything
    assert CaptionRules(exclude=("background",)).apply(TAGS)["general"] == TAGS["general"]
    assert CaptionRules(exclude=("*",)).apply(TAGS)["general"] == {}


def test_replace_maps_and_merges_keeping_the_higher_score():
    rules = CaptionRules(replace=(("completely nude", "nude"), ("smile", "smiling"), ("white_background", "")))
    general = rules.apply(TAGS)["general"]
    assert general == {"long_hair": 0.95, "simple_background": 0.9, "nude": 0.7, "smiling": 0.5}
    assert list(general.values()) == sorted(general.values(), reverse=True)


def test_max_tags_keeps_the_highest_across_heads_not_rating():
    out = CaptionRules(max_tags=2).apply(TAGS)
    assert out["character"] == {"hatsune_miku": 0.99} and out["general"] == {"long_hair": 0.95}
    assert out["rating"] == TAGS["rating"]
    # exclusions and replacements come first: the N are counted among the tags written
    out = CaptionRules(max_tags=2, exclude=("hatsune_miku", "long_hair")).apply(TAGS)
    assert out["general"] == {"simple_background": 0.9, "white_background": 0.8} and out["character"] == {}


def test_add_is_kept_in_order_without_duplicates():
    assert CaptionRules(add=(" sks style", "1girl", "sks style", "")).add == ("sks style", "1girl")


@pytest.mark.parametrize("bad", [{"max_tags": 0}, {"replace": (("", "x"),)}, {"replace": (("a",),)}])
def test_bad_rules_are_one_line(bad):
    with pytest.raises(UserError):
        CaptionRules(**bad)


def test_parse_replace_inline_and_csv(tmp_path):
    assert parse_replace("completely nude=nude, a=b=c") == (("completely nude", "nude"), ("a", "b=c"))
    assert parse_replace(None) == ()
    with pytest.raises(UserError, match="old=new"):
        parse_replace("nude")
    table = tmp_path / "map.csv"
    table.write_text('old,new\ncompletely_nude,nude\n"a, b",c\n\n', encoding="utf-8")
    assert parse_replace(str(table)) == (("completely_nude", "nude"), ("a, b", "c"))
    table.write_text("a,b,c\n")
    with pytest.raises(UserError, match="old,new"):
        parse_replace(str(table))
    with pytest.raises(UserError, match="cannot read"):
        parse_replace(str(tmp_path / "missing.csv"))


def test_merge_caption_keeps_theirs_adds_ours_once_and_drops_ours_from_before():
    theirs = ["my style", "long hair", "blue eyes"]
    assert merge_caption(theirs, ["long_hair", "smile"]) == ["my style", "long hair", "blue eyes", "smile"]
    # what this tool added before goes (it is replaced by today's), the user's stay even if ours named them too
    merged = merge_caption(["my style", "long hair", "smile"], ["red eyes"], ours_before=["smile"])
    assert merged == ["my style", "long hair", "red eyes"]
