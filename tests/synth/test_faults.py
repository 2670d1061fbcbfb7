"""Fault injection on its own: which request each fault fires on, in which order, and what it counts."""

import hashlib

import pytest

from illust2vec.errors import UserError
from illust2vec.synth.faults import ERROR_STATUSES, Faults, Injector, Verdict, corrupt


def verdicts(injector: Injector, kinds: list[str]) -> list[Verdict]:
    return [injector.decide(kind) for kind in kinds]


def test_no_faults_no_verdicts():
    injector = Injector(Faults())
    assert verdicts(injector, ["api", "files"] * 20) == [Verdict()] * 40
    assert set(injector.counts.values()) == {0}


def test_each_fault_fires_where_fires_says_in_order():
    faults = Faults(throttle_rate=0.2, retry_after=4, error_rate=0.2, truncate_rate=0.3, seed=9)
    got = verdicts(Injector(faults), ["api"] * 200)
    for n, verdict in enumerate(got, 1):
        # Throttling is checked before errors, errors before truncation: one verdict per request.
        if faults.fires("throttle", n):
            assert verdict == Verdict(retry_after=4)
        elif faults.fires("error", n):
            assert verdict == Verdict(error=faults.error_status(n))
        else:
            assert verdict == Verdict(truncate=faults.fires("truncate", n))
    kinds = {(v.retry_after is not None, v.error is not None, v.truncate) for v in got}
    assert kinds == {(False, False, False), (True, False, False), (False, True, False), (False, False, True)}
    assert {v.error for v in got} - {None} == set(ERROR_STATUSES)


def test_the_same_seed_gives_the_same_faults_and_another_seed_others():
    kinds = ["api"] * 100
    a = verdicts(Injector(Faults(error_rate=0.3, seed=1)), kinds)
    assert a == verdicts(Injector(Faults(error_rate=0.3, seed=1)), kinds)
    assert a != verdicts(Injector(Faults(error_rate=0.3, seed=2)), kinds)


def test_paths_select_which_requests_are_numbered():
    faults = Faults(error_rate=0.5, paths="files", seed=3)
    injector = Injector(faults)
    mixed = verdicts(injector, ["api", "files"] * 30)
    assert all(v == Verdict() for v in mixed[::2])  # the API is never faulted
    # Only file requests are numbered, so the n-th file request gets the n-th decision.
    assert [v.error is not None for v in mixed[1::2]] == [faults.fires("error", n) for n in range(1, 31)]
    assert injector.counts["errors"] == sum(v.error is not None for v in mixed)


def test_slow_answers_wait_through_the_given_wait():
    waited: list[float] = []
    faults = Faults(slow_rate=0.5, slow_seconds=1.5, seed=3)
    injector = Injector(faults, wait=waited.append)
    verdicts(injector, ["api"] * 20)
    slow = [n for n in range(1, 21) if faults.fires("slow", n)]
    assert slow and waited == [1.5] * len(slow) and injector.counts["slow"] == len(slow)


def test_bad_md5_is_chosen_by_post_and_changes_one_byte():
    faults = Faults(bad_md5_rate=0.4, seed=5)
    injector = Injector(faults)
    data = bytes(range(256)) * 4
    bad = [post_id for post_id in range(1, 101) if faults.is_bad_md5(post_id)]
    assert 20 <= len(bad) <= 60
    for post_id in range(1, 101):
        served = injector.original(post_id, data)
        assert len(served) == len(data)
        assert (hashlib.md5(served).digest() != hashlib.md5(data).digest()) == (post_id in bad)
        assert sum(a != b for a, b in zip(served, data, strict=True)) == (post_id in bad)
    assert injector.counts["bad_md5"] == len(bad)
    assert corrupt(b"") == b""


def test_html_and_cut_json_fire_on_api_requests_only_after_the_others():
    faults = Faults(error_rate=0.2, html_rate=0.25, truncate_rate=0.15, cut_json_rate=0.25, seed=6)
    kinds = ["api", "files", "api"] * 80
    got = verdicts(Injector(faults), kinds)
    for n, (kind, verdict) in enumerate(zip(kinds, got, strict=True), 1):
        api = kind == "api"
        if faults.fires("error", n):
            assert verdict == Verdict(error=faults.error_status(n))
        elif api and faults.fires("html", n):
            assert verdict == Verdict(html=True)
        elif faults.fires("truncate", n):
            assert verdict == Verdict(truncate=True)  # the wire-level cut wins over the clean one
        else:
            assert verdict == Verdict(cut_json=api and faults.fires("cut_json", n))
    files = [v for kind, v in zip(kinds, got, strict=True) if kind == "files"]
    assert not any(v.html or v.cut_json for v in files)
    assert sum(v.html for v in got) > 0 and sum(v.cut_json for v in got) > 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"error_rate": 1.5}, "error_rate"),
        ({"bad_md5_rate": -0.1}, "bad_md5_rate"),
        ({"html_rate": 1.5}, "html_rate"),
        ({"cut_json_rate": -0.5}, "cut_json_rate"),
        ({"rate_limit": -1}, "rate_limit"),
        ({"slow_seconds": -2.0}, "slow_seconds"),
        ({"paths": "images"}, "paths"),
    ],
)
def test_faults_check_themselves(kwargs, field):
    with pytest.raises(UserError, match=f"Faults.{field} "):
        Faults(**kwargs)
