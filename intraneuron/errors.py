"""Errors a researcher can act on: each names the config key, the bad value and what is allowed."""

from __future__ import annotations

from collections.abc import Iterable


class ConfigError(ValueError):
    """A configuration value is invalid. Raised before any heavy work starts."""

    def __init__(self, key: str, value: object, allowed: str | Iterable[object]):
        if not isinstance(allowed, str):
            allowed = "one of " + ", ".join(repr(a) for a in allowed)
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is not allowed: expected {allowed}")

    def __reduce__(self):
        # picklable, so that a sweep job's error reaches the launcher (joblib) as itself
        return type(self), (self.key, self.value, self.allowed)


def unresolvable(error: Exception) -> ConfigError:
    """The ConfigError for an OmegaConf interpolation that does not resolve (`layer=${nope}`)."""
    key = getattr(error, "full_key", None) or "config"
    first_line = str(error).split("\n")[0]
    return ConfigError(key, "(unresolvable)", f"a resolvable value ({first_line})")


class MissingAssetError(FileNotFoundError):
    """A file the run needs (model, corpus, vendored data) is not where it should be."""


class NotFound(LookupError):
    """No such run or experiment in the tracking store."""
