"""User-facing errors: one line that says what is wrong and what to do."""

__all__ = ["RescompileError"]


class RescompileError(Exception):
    """Bad input or a refused request. The CLI prints it as one line and exits 2."""
