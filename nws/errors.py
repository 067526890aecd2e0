"""The library's error type: every problem with a user's input or files is an :class:`NWSError`."""


class NWSError(Exception):
    """A user-facing error; its message is one line that says what is wrong and, where possible, what to do."""
