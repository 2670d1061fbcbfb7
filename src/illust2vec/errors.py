"""The one exception type for a user's mistake or bad input: the CLI prints it as one line and exits non-zero."""

import errno
import sqlite3


class UserError(Exception):
    """Bad input a person can fix (a missing file, a malformed option); never a bug in illust2vec."""


def is_disk_full(e: BaseException) -> bool:
    """Whether an error means the disk (or the quota) is full: the one condition that stops a stage cleanly."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(e, sqlite3.OperationalError) and "full" in str(e)
