"""The one exception type for errors a user can cause and fix."""


class SparseAllocError(Exception):
    """Bad input or environment; the message says what to fix."""
