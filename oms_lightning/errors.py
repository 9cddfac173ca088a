"""One exception type for user mistakes: the entry points print its message and exit non-zero, no traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad config, missing or corrupt file, unavailable device).

    The message says what was wrong and how to fix it.
    """
