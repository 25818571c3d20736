"""The one exception type the command line turns into a clean message and a non-zero exit."""


class ExportError(Exception):
    """Bad input or a failed step, worded for the user: what is wrong, where, and how to fix it."""
