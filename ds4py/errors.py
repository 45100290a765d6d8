"""Errors a user can act on. Each names the file or input and says what to do."""


class Ds4pyError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class ModelFormatError(Ds4pyError):
    """A model file or directory is missing, truncated, of the wrong shape or of another architecture."""


class ContextOverflowError(Ds4pyError):
    """A prompt (plus the tokens asked for) does not fit in the context."""
