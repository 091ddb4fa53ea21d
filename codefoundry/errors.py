"""User-facing errors: the CLI prints these as one line (no traceback) and exits 2."""


class UserError(Exception):
    """Something the user must fix (bad path, bad config key, corrupt checkpoint...).

    The message is one line that says what is wrong and what to do.
    """
