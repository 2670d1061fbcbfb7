"""`--shard I/N`: parsed once for every command, and the items of N parts cover every item exactly once."""

import pytest

from illust2vec.errors import UserError
from illust2vec.util.shard import check_shard, in_shard, parse_shard


def test_parse_and_check():
    assert parse_shard("2/4") == check_shard("2/4") == check_shard((2, 4)) == check_shard([2, 4]) == (2, 4)
    for bad, needle in [("4/4", "--shard 4/4: need"), ("-1/3", "need 0 <= I < N"), ("a/b", "--shard takes I/N")]:
        with pytest.raises(UserError, match=needle):
            parse_shard(bad)
    for bad in [(1, 0), (0.0, 1), (1,), None, 3]:
        with pytest.raises(UserError, match="--shard"):
            check_shard(bad)


def test_every_item_is_in_exactly_one_part():
    keys = [f"folder/{i:04d}.png" for i in range(300)]
    for n in (1, 2, 7):
        owners = [[i for i in range(n) if in_shard(k, (i, n))] for k in keys]
        assert all(len(o) == 1 for o in owners)
        if n > 1:
            assert len({o[0] for o in owners}) == n  # every part gets some
    # CRC-32 of the key: the same part on every machine and in every release, so a job array can be rerun
    assert in_shard("a.png", (2, 3)) and in_shard("folder/0001.png", (4, 5))
