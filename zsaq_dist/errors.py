"""Errors a user can act on. Each message says what went wrong and how to fix it."""


class ZsaqError(Exception):
    """Base class: the CLI prints these as one line (no traceback) and exits 2."""


class ConfigError(ZsaqError):
    """The configuration cannot be used as written."""


class ModelLoadError(ZsaqError):
    """The model cannot be found, read or quantized as asked."""


class ExportError(ZsaqError):
    """The checkpoint could not be written completely."""


class VerifyError(ZsaqError):
    """A checkpoint on disk does not match its manifest."""
