"""The one exception type that the command line turns into a one-line message."""


class OrthodiffError(Exception):
    """A problem with the user's input: the message names the file or field and the fix."""


class ScanError(OrthodiffError):
    """One series could not be read; the archive goes on without it."""
