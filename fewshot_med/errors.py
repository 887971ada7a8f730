"""User-facing errors: the CLI prints their message as one line, without a traceback."""


class FewshotMedError(Exception):
    """An error the user can fix; its message names the file or key and says what to do."""


class DataError(FewshotMedError):
    """Unreadable, missing or inconsistent data."""


class ConfigError(FewshotMedError):
    """An invalid configuration file or override."""
