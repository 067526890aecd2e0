"""The library's error types: every problem with a user's input or files is an :class:`NWSError`."""


class NWSError(Exception):
    """A user-facing error; its message is one line that says what is wrong and, where possible, what to do."""


class StoreError(NWSError):
    """A run directory or one of its files that cannot be used as asked (missing, corrupt, newer format,
    mismatched)."""
