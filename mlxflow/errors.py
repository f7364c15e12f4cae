"""The one exception type that means "the user did something we can explain".

The CLI catches it and prints its message as a single line with a non-zero exit;
anything else is a bug and keeps its traceback.
"""


class MlxflowError(Exception):
    """A user-facing error: bad path, unknown preset, corrupt input, NaN loss..."""
