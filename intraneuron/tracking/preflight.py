"""The tracking location checked in seconds, before MLflow is asked anything.

MLflow's own client retries for minutes against a server that is absent or whose database is down,
close to two minutes against a sqlite file it cannot write, and a missing database driver is a
61-line traceback from inside it; each of these is one ConfigError naming `tracking.<key>` here.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from intraneuron.errors import ConfigError
from intraneuron.tracking.redact import redact
from intraneuron.tracking.store import KEY, TrackingConfig, resolve

CONNECT_TIMEOUT_S = 3.0
_SQLITE_HEADER = b"SQLite format 3\x00"
_DEFAULT_PORTS = {"http": 80, "https": 443}
# one cheap call of MLflow's REST API: its answer tells an MLflow server from any other web server
_API_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"
_AUTH_STATUSES = (401, 403)  # an auth layer or a proxy in front of the server: MLflow says what it needs
_MAX_ANSWER_BYTES = 1 << 20  # an experiment with long tags answers a few KB; a web page can be endless


def check_reachable(tcfg: TrackingConfig, base_dir: str | Path, *, writes: bool = True) -> None:
    """Fail fast, with a ConfigError naming the key, where MLflow would retry for minutes.

    - sqlite: the database's folder is created if missing and must take a new file (a real file is
      written and removed: permission bits say nothing for root, nor for read-only mounts, /proc or
      /sys); an existing database must be a writable SQLite file.
    - a local artifact root (configured, or the sqlite default) must be creatable and writable; it
      is not created here (MLflow creates it on the first artifact).
    - http(s): the server must accept a TCP connection within CONNECT_TIMEOUT_S, its `/health`
      must not answer a server error (an `mlflow server` whose own database is down answers 5xx,
      and MLflow's client would retry each call for minutes), and one call of MLflow's REST API
      must get MLflow's JSON back (another web server at that address would make MLflow's client
      fail with a long traceback). 401 and 403 are left to MLflow.
    - another database (postgresql://, mysql://, mssql://): its driver must be installed, and the
      database must accept a connection within CONNECT_TIMEOUT_S.
    Databricks URIs are left to MLflow.

    `writes=False` is for commands that only read runs back: a sqlite database must then exist and
    be readable (a read-only copy is fine), and the artifact root is not checked.
    """
    resolved = resolve(tcfg, Path(base_dir))
    uri = str(tcfg.tracking_uri)
    scheme = urlparse(uri).scheme
    if resolved.sqlite_file is not None:
        _check_sqlite(resolved.sqlite_file, uri, writes=writes)
    if writes and resolved.artifact_dir is not None:  # local checks first, the network's after
        problem = unwritable(resolved.artifact_dir, create=False)
        if problem:
            default = "" if tcfg.artifact_root is not None else f" (by default {resolved.artifact_dir})"
            raise ConfigError(
                f"{KEY}.artifact_root", tcfg.artifact_root,
                f"a folder that can be created and written{default}: {problem}",
            )
    if scheme in _DEFAULT_PORTS:
        _check_server(uri)
        _check_server_answers(uri)
    elif scheme.split("+")[0] in _DATABASES:
        _check_database(uri)


def _check_sqlite(db_file: Path, uri: str, *, writes: bool) -> None:
    if writes:
        # sqlite also writes a journal next to the database, so the folder must be writable even when the file is
        problem = unwritable(db_file.parent, create=True)
        wanted = "in a folder that can be created and written, naming a new or a writable SQLite file"
    else:
        problem = None if db_file.exists() or db_file.is_symlink() else f"{db_file} does not exist"
        wanted = "naming an existing, readable SQLite file"
    if problem is None and (db_file.exists() or db_file.is_symlink()):
        problem = _not_a_database(db_file, writes=writes)
    if problem:
        raise ConfigError(f"{KEY}.tracking_uri", uri, f"sqlite:///<file> {wanted} ({problem})")


def unwritable(folder: Path, *, create: bool) -> str | None:
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


def _not_a_database(db_file: Path, *, writes: bool) -> str | None:
    if not db_file.is_file():
        return f"{db_file} exists and is not a regular file"
    try:
        with open(db_file, "r+b" if writes else "rb") as handle:  # nothing written
            header = handle.read(len(_SQLITE_HEADER))
    except OSError as error:
        return f"cannot open {db_file} for {'writing' if writes else 'reading'}: {_reason(error)}"
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
        raise ConfigError(f"{KEY}.tracking_uri", redact(uri), f"{form} ({error})") from None
    if not host:
        raise ConfigError(f"{KEY}.tracking_uri", redact(uri), f"{form} (no host)")
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
    raise ConfigError(
        f"{KEY}.tracking_uri", redact(uri),
        f"a reachable MLflow server ({problem}; check that `mlflow server` runs there and the host and port are right)",
    )


def _check_server_answers(uri: str) -> None:
    """GET <server>/health, then one call of MLflow's REST API, each answered within CONNECT_TIMEOUT_S.

    A 5xx is a server that cannot serve runs; an API answer that is not MLflow's JSON (a 2xx JSON
    object, or a 4xx one with MLflow's `error_code`) is another web server at that address. 401 and
    403 (an auth layer or a proxy's) and other answers to /health are left to the next step.
    """
    import base64
    import http.client
    import urllib.request
    from urllib.parse import unquote

    parsed = urlparse(uri)
    shown = redact(uri)  # no password in a message
    # urllib takes no user:password@ in a URL; MLflow's client (requests) sends it as basic auth
    base = parsed._replace(netloc=parsed.netloc.rpartition("@")[2]).geturl().rstrip("/")
    headers = {}
    if parsed.username is not None:
        user_password = f"{unquote(parsed.username)}:{unquote(parsed.password or '')}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(user_password).decode()
    loopback = parsed.hostname in ("127.0.0.1", "localhost", "::1")  # never through a proxy
    opener = urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if loopback else []))
    for path in ("/health", _API_PROBE):
        url = shown.rstrip("/") + path
        try:
            status, reason, body = _answer(opener, urllib.request.Request(base + path, headers=headers))
        except (OSError, http.client.HTTPException) as error:  # URLError, a timeout, a reset, not HTTP
            problem = f"no answer from {url} within {CONNECT_TIMEOUT_S:g} s ({getattr(error, 'reason', error)})"
            raise ConfigError(f"{KEY}.tracking_uri", shown, f"a working MLflow server ({problem})") from None
        if status in _AUTH_STATUSES:
            return
        if status >= 500:
            raise ConfigError(
                f"{KEY}.tracking_uri", shown, f"a working MLflow server ({url} answered {status} {reason})"
            )
        if path == _API_PROBE and not _is_mlflow_answer(status, body):
            raise ConfigError(
                f"{KEY}.tracking_uri", shown,
                f"the address of an `mlflow server` ({url} answered {status} {reason}, not MLflow's JSON: "
                f"another web server listens there; check the host, port and path)",
            )


def _answer(opener, request) -> tuple[int, str, bytes]:
    """(status, reason, start of the body) of a GET; OSError when nothing answers in time."""
    import urllib.error

    try:
        with opener.open(request, timeout=CONNECT_TIMEOUT_S) as response:
            return response.status, response.reason, response.read(_MAX_ANSWER_BYTES)
    except urllib.error.HTTPError as error:
        with error:
            return error.code, str(error.reason), error.read(_MAX_ANSWER_BYTES)


def _is_mlflow_answer(status: int, body: bytes) -> bool:
    try:
        answer = json.loads(body)
    except ValueError:  # not JSON (or not UTF-8)
        return False
    if not isinstance(answer, dict):
        return False
    return 200 <= status < 300 or "error_code" in answer


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
