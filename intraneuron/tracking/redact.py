"""Passwords in URIs are never written or printed: `scheme://user:pw@host` becomes `scheme://user:***@host`.

A tracking URI may carry a password (`postgresql+psycopg://user:pw@host/db`, `http://user:pw@host:port`).
The connection uses it as given; everything a run writes or prints passes through `redact`: MLflow
params, tags and run names (`params.py`, `run.py`), text artifacts (`RunLogger.log_text`),
`mlflow_run.json`, error messages, log lines (`RedactingFormatter`, set in conf/config.yaml for the
console and the job's log file) and the files Hydra writes itself (`redact_callback.py`).

Only the standard library here: config validation (`preflight.py`) and Hydra's logging set-up
import this module.
"""

from __future__ import annotations

import logging
import re

MASK = "***"

# scheme://user:password@ where the password is what RFC 3986 allows in user information, percent-
# encoded special characters included. Hydra escapes ':' in the overrides of a sweep's jobs
# (`http\://user\:pw@host`), hence the optional backslashes. A password that breaks the rules (a raw
# '@' or '/') is still hidden, up to the last '@' before a space or a double quote: too much hidden beats a leak.
_PASSWORD = re.compile(
    r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*\\?://[^\s:/?#@\[\]'\"<>]*\\?:)"
    r"[^\s\"<>]+(?=@)"
)


def redact(text: str) -> str:
    """`text` with the password of every URI in it replaced by MASK; URIs without one are unchanged."""
    return _PASSWORD.sub(rf"\g<head>{MASK}", text)


class RedactingFormatter(logging.Formatter):
    """A log line, traceback included, with passwords in URIs masked (Hydra's `simple` formatter)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))
