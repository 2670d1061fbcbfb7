"""The one exception type for a user's mistake or bad input: the CLI prints it as one line and exits non-zero."""


class UserError(Exception):
    """Bad input a person can fix (a missing file, a malformed option); never a bug in illust2vec."""
