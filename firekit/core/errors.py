"""The one exception type firekit raises for bad input; faces print it as one line and exit 2."""

__all__ = ["FirekitError"]


class FirekitError(ValueError):
    """Bad input or state, with a one-line message naming the file or value and the fix."""
