"""The tracking location checked in seconds, before MLflow is asked anything.

MLflow's own client retries for minutes against a server that is absent or whose database is down,
close to two minutes against a sqlite file it cannot write, and a missing database driver is a
61-line traceback from inside it; each of these is one ConfigError naming `tracking.<key>` here.
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from intraneuron.errors import ConfigError
from intraneuron.tracking.redact import redact
from intraneuron.tracking.store import KEY, TrackingConfig, resolve
from intraneuron.tracking.ui import ui_base

CONNECT_TIMEOUT_S = 3.0
_SQLITE_HEADER = b"SQLite format 3\x00"
_DEFAULT_PORTS = {"http": 80, "https": 443}


def check_reachable(tcfg: TrackingConfig, base_dir: str | Path) -> None:
    """Fail fast, with a ConfigError naming the key, where MLflow would retry for minutes.

    - sqlite: the database's folder is created if missing and must take a new file (a real file is
      written and removed: permission bits say nothing for root, nor for read-only mounts, /proc or
      /sys); an existing database must be a writable SQLite file.
    - http(s): the server must accept a TCP connection within CONNECT_TIMEOUT_S. No request is sent.
    - a local artifact root (configured, or the sqlite default) must be creatable and writable; it
      is not created here (MLflow creates it on the first artifact).
    - http(s): the server must accept a TCP connection within CONNECT_TIMEOUT_S, and its `/health`
      must not answer a server error (an `mlflow server` whose own database is down answers 5xx,
      and MLflow's client would retry each call for minutes).
    - another database (postgresql://, mysql://, mssql://): its driver must be installed, and the
      database must accept a connection within CONNECT_TIMEOUT_S.
    Databricks URIs are left to MLflow.
    """
    resolved = resolve(tcfg, Path(base_dir))
    uri = str(tcfg.tracking_uri)
    scheme = urlparse(uri).scheme
    if resolved.sqlite_file is not None:
        _check_sqlite(resolved.sqlite_file, uri)
    if resolved.artifact_dir is not None:  # local checks first, the network's after
        problem = _unwritable(resolved.artifact_dir, create=False)
        if problem:
            default = "" if tcfg.artifact_root is not None else f" (by default {resolved.artifact_dir})"
            raise ConfigError(
                f"{KEY}.artifact_root", tcfg.artifact_root,
                f"a folder that can be created and written{default}: {problem}",
            )
    if scheme in _DEFAULT_PORTS:
        _check_server(uri)
        _check_server_health(uri)
    elif scheme.split("+")[0] in _DATABASES:
        _check_database(uri)


def _check_sqlite(db_file: Path, uri: str) -> None:
    # sqlite also writes a journal next to the database, so the folder must be writable even when the file is
    problem = _unwritable(db_file.parent, create=True)
    if problem is None and (db_file.exists() or db_file.is_symlink()):
        problem = _not_a_writable_database(db_file)
    if problem:
        raise ConfigError(
            f"{KEY}.tracking_uri", uri,
            f"sqlite:///<file> in a folder that can be created and written, naming a new or a "
            f"writable SQLite file ({problem})",
        )


def _unwritable(folder: Path, *, create: bool) -> str | None:
    """Why no file can be written in `folder` (created first when `create`), or None.

    Without `create`, a missing folder is judged by its nearest existing ancestor, which must take
    a new entry; nothing is left behind.
    """
    existing = folder
    try:
        while not existing.exists() and existing != existing.parent:
            if existing.is_symlink():
                return f"{existing} is a dangling link"
            existing = existing.parent
        if not existing.is_dir():
            return f"{existing} is not a folder"
    except OSError as error:  # e.g. a folder on the way that cannot be searched
        return f"cannot look into {existing}: {_reason(error)}"
    target = existing
    if create and existing != folder:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            return f"cannot create {folder}: {_reason(error)}"
        target = folder
    try:
        handle, probe = tempfile.mkstemp(prefix=".intraneuron-probe-", dir=target)
    except OSError as error:
        return f"cannot write in {target}: {_reason(error)}"
    os.close(handle)
    try:
        os.unlink(probe)
    except OSError as error:
        return f"cannot remove a file from {target}: {_reason(error)}"
    return None


def _not_a_writable_database(db_file: Path) -> str | None:
    if not db_file.is_file():
        return f"{db_file} exists and is not a regular file"
    try:
        with open(db_file, "r+b") as handle:  # opened for writing, nothing written
            header = handle.read(len(_SQLITE_HEADER))
    except OSError as error:
        return f"cannot open {db_file} for writing: {_reason(error)}"
    if header and header != _SQLITE_HEADER:
        return f"{db_file} is not a SQLite database"
    return None


def _reason(error: OSError) -> str:
    if error.errno == errno.EROFS:
        return "read-only file system"
    return error.strerror or str(error)


def _check_server(uri: str) -> None:
    parsed = urlparse(uri)
    form = "http(s)://<host>:<port> of an `mlflow server`"
    try:
        host, port = parsed.hostname, parsed.port or _DEFAULT_PORTS[parsed.scheme]
    except ValueError as error:  # a port that is not a number
        raise ConfigError(f"{KEY}.tracking_uri", uri, f"{form} ({error})") from None
    if not host:
        raise ConfigError(f"{KEY}.tracking_uri", uri, f"{form} (no host)")
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except TimeoutError:
        problem = f"no answer from {host}:{port} within {CONNECT_TIMEOUT_S:g} s"
    except ConnectionRefusedError:
        problem = f"connection to {host}:{port} refused"
    except socket.gaierror as error:
        problem = f"unknown host {host}: {error.strerror}"
    except OSError as error:
        problem = f"cannot connect to {host}:{port}: {error.strerror or error}"
    else:
        return
    raise ConfigError(f"{KEY}.tracking_uri", uri, f"a reachable MLflow server ({problem})")


def _check_server_health(uri: str) -> None:
    """GET <server>/health: a 5xx or no answer within CONNECT_TIMEOUT_S is a server that cannot
    serve runs; any other answer (4xx behind a proxy or an auth layer included) is left to MLflow."""
    import urllib.error
    import urllib.request

    url = ui_base(uri) + "/health"  # urllib cannot open a URL with user information
    loopback = urlparse(uri).hostname in ("127.0.0.1", "localhost", "::1")  # never through a proxy
    opener = urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if loopback else []))
    try:
        with opener.open(url, timeout=CONNECT_TIMEOUT_S):
            return
    except urllib.error.HTTPError as error:
        if error.code < 500:
            return
        problem = f"{url} answered {error.code} {error.reason}"
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        reason = getattr(error, "reason", error)
        problem = f"no answer from {url} within {CONNECT_TIMEOUT_S:g} s ({reason})"
    raise ConfigError(f"{KEY}.tracking_uri", uri, f"a working MLflow server ({problem})")


def _check_database(uri: str) -> None:
    """The SQLAlchemy driver of `uri` is importable and the database answers within CONNECT_TIMEOUT_S.

    Without this, a missing driver is a 61-line traceback from inside MLflow, and a database that
    does not answer is minutes of retries.
    """
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
    from sqlalchemy.pool import NullPool

    key = f"{KEY}.tracking_uri"
    try:
        url = make_url(uri)
        dialect = url.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as error:
        raise ConfigError(key, redact(uri), f"a database URI SQLAlchemy knows ({_first_line(error)})") from None
    try:
        dialect.import_dbapi()
    except ImportError as error:
        hint = _DRIVER_HINTS.get(url.get_backend_name(), "install the driver named in the URI")
        raise ConfigError(
            key, redact(uri), f"a URI whose driver is installed: {url.drivername} needs "
            f"{error.name or error} ({hint})",
        ) from None
    timeout_args = _CONNECT_TIMEOUT_ARGS.get(url.get_backend_name(), {})
    engine = create_engine(url, connect_args=timeout_args, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as error:
        raise ConfigError(
            key, redact(uri),
            f"a database that accepts a connection within {CONNECT_TIMEOUT_S:g} s "
            f"({_first_line(getattr(error, 'orig', None) or error)})",
        ) from None
    finally:
        engine.dispose()


_DATABASES = ("postgresql", "postgres", "mysql", "mssql")
_DRIVER_HINTS = {
    "postgresql": "`make setup` installs psycopg 3 (pip extra `scale`), SQLAlchemy's default for "
                  "postgresql:// and the driver of postgresql+psycopg://",
    "mysql": "e.g. pip install pymysql and write mysql+pymysql://...",
}
_CONNECT_TIMEOUT_ARGS = {
    "postgresql": {"connect_timeout": int(CONNECT_TIMEOUT_S)},
    "mysql": {"connect_timeout": int(CONNECT_TIMEOUT_S)},
}


def _first_line(error: object) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
