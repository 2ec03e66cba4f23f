"""Real servers for scale-out tests, on 127.0.0.1 only, on free ports, stopped by process id.

    with LocalPostgres() as db_uri, LocalMlflowServer(db_uri, tmp / "artifacts") as server:
        ...  # server.url is http://127.0.0.1:<port>, a tracker on PostgreSQL
    with LocalRayCluster() as cluster:
        ...  # cluster.address is 127.0.0.1:<port>; RAY_ADDRESS=cluster.address for a driver

`LocalPostgres` runs Debian's PostgreSQL binaries (`initdb`, `postgres`) in a temporary data
directory with trust authentication, as the `postgres` user when we are root (postgres refuses to
run as root). `LocalRayCluster` runs `ray start --head --block` as our own child in its own process
group; every process of the cluster (GCS, raylet, workers, monitors) descends from it, and on stop
each one is signalled by its id and checked to be gone. `skip_unless_postgres` and
`skip_unless_ray` skip a test only when the binaries or the package are genuinely absent.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from intraneuron.tracking.server import HOST, free_port, pid_alive

PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)  # the newest first
STOP_TIMEOUT = 20.0
# Ray (2.60) replaces 127.0.0.1 in an address by the machine's outward IP and binds its gRPC servers
# to every interface, unless it believes it runs on one machine only: this setting (read by every
# Ray process, driver included) makes it keep and bind 127.0.0.1.
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


# ---------------------------------------------------------------------------------------- helpers


def postgres_bin(name: str) -> str | None:
    """The path of a PostgreSQL server binary (initdb, postgres), or None."""
    for folder in PG_BIN_DIRS:
        if (folder / name).is_file():
            return str(folder / name)
    return shutil.which(name)


def skip_unless_postgres() -> None:
    missing = [name for name in ("initdb", "postgres") if postgres_bin(name) is None]
    if missing:
        pytest.skip(
            f"PostgreSQL server binaries not installed ({', '.join(missing)}; Debian package `postgresql`)"
        )
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg (PostgreSQL driver) not installed: pip install 'intraneuron[scale]'")


def skip_unless_ray() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        pytest.skip("ray not installed: pip install 'intraneuron[scale]'")
    if ray_bin() is None:
        pytest.skip("the `ray` command is not installed next to this interpreter")


def ray_bin() -> str | None:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.is_file() else shutil.which("ray")


def descendants(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).children(recursive=True)
    return []


def stop_processes(
    root: subprocess.Popen, others: list[psutil.Process], sig: int, timeout: float
) -> list[int]:
    """Send `sig` to `root` (then SIGKILL after `timeout`) and wait for it and `others` to be gone;
    whatever is left of `others` is killed by id. Returns the ids still alive (empty on success)."""
    with contextlib.suppress(ProcessLookupError):
        root.send_signal(sig)
    try:
        root.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            root.kill()
        root.wait(timeout)
    _, alive = psutil.wait_procs(others, timeout=timeout)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    _, alive = psutil.wait_procs(alive, timeout=timeout)
    left = [p.pid for p in alive]
    if pid_alive(root.pid) and root.returncode is None:
        left.append(root.pid)
    return left


def _as_postgres_user() -> dict:
    """Popen arguments that run a PostgreSQL binary as `postgres` when we are root (exec'd
    directly, so the child's id is the server's own)."""
    if os.getuid() != 0:
        return {}
    import grp
    import pwd

    user = pwd.getpwnam("postgres")
    groups = [g.gr_gid for g in grp.getgrall() if "postgres" in g.gr_mem]
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": groups}


def distinct_free_ports(count: int) -> list[int]:
    """`count` free ports on 127.0.0.1, all different: each socket stays bound until all are
    chosen (closing one before binding the next may hand the same port out twice)."""
    with contextlib.ExitStack() as stack:
        sockets = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            for _ in range(count)
        ]
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def worker_port_band(taken: set[int], width: int = 100) -> tuple[int, int]:
    """A band of `width` free ports below the kernel's ephemeral range (where the free ports the
    other components got come from), none of them in `taken`; its first and last port."""
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    bases = list(range(10000, ephemeral_low - width, width))
    start = os.getpid() % len(bases)  # two clusters started together look in different places
    for base in bases[start:] + bases[:start]:
        band = range(base, base + width)
        if taken.isdisjoint(band) and all(_port_free(port) for port in band):
            return base, base + width - 1
    raise RuntimeError(f"no band of {width} free ports below {ephemeral_low} for Ray's workers")


def wait_until(process: subprocess.Popen, ready, name: str, what: str, timeout: float, log_tail,
               interval: float) -> None:  # fmt: skip
    """Poll `ready()` every `interval` s until it is true; RuntimeError with the log's tail if the
    server's process exits first, TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}: not {what} within {timeout:.0f} s:\n{log_tail()}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------- PostgreSQL


class LocalPostgres:
    """A throw-away PostgreSQL server on 127.0.0.1:<free port> with one database.

    Entering yields the SQLAlchemy URI `postgresql+psycopg://postgres@127.0.0.1:<port>/<database>`
    (trust authentication, no password). With `password`, connections over TCP must give it
    (SCRAM) and the URI carries it, percent-encoded: `postgres:<password>@`. Leaving sends SIGINT (fast shutdown) to the postmaster,
    SIGKILL after `stop_timeout`, checks that it and every backend it had are gone, and removes the
    data directory.
    """

    def __init__(
        self,
        database: str = "mlflow",
        *,
        password: str | None = None,
        start_timeout: float = 60.0,
        stop_timeout: float = STOP_TIMEOUT,
    ):
        self.database, self.password = database, password
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.root: Path | None = None
        self.port: int | None = None
        self.process: subprocess.Popen | None = None

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def uri(self) -> str:
        from urllib.parse import quote

        user = "postgres" if self.password is None else f"postgres:{quote(self.password, safe='')}"
        return f"postgresql+psycopg://{user}@{HOST}:{self.port}/{self.database}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def conninfo(self, database: str | None = None) -> str:
        from psycopg.conninfo import make_conninfo

        return make_conninfo(host=HOST, port=self.port, user="postgres", dbname=database or self.database,
                             connect_timeout=2, password=self.password)  # fmt: skip

    def __enter__(self) -> str:
        self.start()
        return self.uri

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> LocalPostgres:
        skip_unless_postgres()
        # not under pytest's 0700 root-owned tmp folders: the postgres user must reach it
        self.root = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp"))
        try:
            owner = _as_postgres_user()
            if owner:
                os.chown(self.root, owner["user"], owner["group"])
            env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
            env["LC_ALL"] = env["LANG"] = "C.UTF-8"
            initdb = [postgres_bin("initdb"), "-D", str(self.data_dir), "-U", "postgres",
                      "--auth=trust", "--encoding=UTF8", "--no-sync"]  # fmt: skip
            if self.password is not None:  # the superuser's password, required over TCP only
                secret = self.root / "password"
                secret.write_text(self.password + "\n")
                initdb += ["--auth-host=scram-sha-256", f"--pwfile={secret}"]
            done = subprocess.run(
                initdb, env=env, cwd=self.root, capture_output=True, text=True, timeout=120, **owner
            )
            if done.returncode != 0:
                raise RuntimeError(
                    f"initdb failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
                )
            self.port = free_port()
            command = [
                postgres_bin("postgres"), "-D", str(self.data_dir), "-p", str(self.port),
                "-k", str(self.root), "-h", HOST,
                "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                "-c", "max_connections=50", "-c", "shared_buffers=32MB",
            ]  # fmt: skip
            with (self.root / "server.log").open("wb") as log:
                self.process = subprocess.Popen(
                    command, env=env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True, **owner,
                )  # fmt: skip
            self._wait_ready()
            self._create_database()
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, chars: int = 3000) -> str:
        log = self.root / "server.log" if self.root else None
        return log.read_text(errors="replace")[-chars:] if log and log.exists() else ""

    def _wait_ready(self) -> None:
        import psycopg

        def accepts() -> bool:
            try:
                with psycopg.connect(self.conninfo("postgres")):
                    return True
            except psycopg.OperationalError:
                return False

        wait_until(
            self.process,
            accepts,
            "postgres",
            "accepting connections",
            self.start_timeout,
            self.log_tail,
            0.2,
        )

    def _create_database(self) -> None:
        import psycopg

        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{self.database}"')

    def stop(self) -> None:
        """Fast shutdown by the postmaster's id; raises if it or a backend outlives SIGKILL."""
        try:
            if self.process is not None:
                backends = descendants(self.pid)
                left = stop_processes(self.process, backends, signal.SIGINT, self.stop_timeout)
                if left:
                    raise RuntimeError(f"postgres processes {left} outlived SIGKILL")
        finally:
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------------------------------- Ray


class LocalRayCluster:
    """A one-node Ray cluster: `ray start --head --block` on 127.0.0.1:<free port>.

    `address` ("127.0.0.1:<port>") is what RAY_ADDRESS or `hydra.launcher.ray.init.address` take.
    Ray workers inherit the environment of the cluster, not of the driver: pass what jobs need
    (INTRANEURON_CACHE, HF_HUB_OFFLINE, ...) in `env`. The cluster and its drivers (`driver_env`)
    share a token of their own, so that none of them reads the user's Ray state (`auth_env`). Stopping sends SIGTERM to `ray start`
    (which tears its services down), then kills by id every process of the cluster that is left:
    the descendants of `ray start` and every process whose command line names this cluster's
    temporary directory or GCS port (a worker re-parented to init still does).
    """

    def __init__(
        self,
        num_cpus: int = 2,
        *,
        env: dict[str, str] | None = None,
        object_store_mb: int = 100,
        start_timeout: float = 120.0,
        stop_timeout: float = STOP_TIMEOUT,
    ):
        self.num_cpus, self.object_store_mb = num_cpus, object_store_mb
        self.extra_env = dict(env or {})
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.temp_dir: Path | None = None
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self.token = secrets.token_hex(16)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def driver_env(self) -> dict[str, str]:
        """What a driver's environment needs to use this cluster over 127.0.0.1."""
        return {"RAY_ADDRESS": self.address, **LOOPBACK_ONLY, **self.auth_env()}

    def auth_env(self) -> dict[str, str]:
        """Token authentication on, with this cluster's own token, for the cluster and its drivers.

        Left to itself, Ray turns token authentication on for `ray start` whenever a token file
        ~/.ray/auth_token exists (any earlier `ray.init()` writes one), but not for a driver given an
        address, which then sends none: the cluster refused its own drivers (InvalidAuthToken). The
        RAY_AUTH_TOKEN variable wins over any token file, so both sides agree whatever ~/.ray holds.
        """
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> LocalRayCluster:
        skip_unless_ray()
        # short: Ray's unix sockets live under it (108 characters at most)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        # every port chosen at once (so no two coincide), the workers' band outside all of them
        ports = distinct_free_ports(9)
        self.port = ports[0]
        low, high = worker_port_band(set(ports))
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "HYDRA_"))
        }
        env.update(self.extra_env)
        env.update(LOOPBACK_ONLY)
        env.update(self.auth_env())
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        command = [
            ray_bin(), "start", "--head", "--block", "--disable-usage-stats",
            f"--node-ip-address={HOST}", f"--port={self.port}", f"--num-cpus={self.num_cpus}", "--num-gpus=0",
            "--include-dashboard=false", f"--dashboard-port={ports[1]}", f"--temp-dir={self.temp_dir}",
            f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
            f"--node-manager-port={ports[2]}", f"--object-manager-port={ports[3]}",
            f"--ray-client-server-port={ports[4]}", f"--min-worker-port={low}",
            f"--max-worker-port={high}", f"--metrics-export-port={ports[5]}",
            f"--dashboard-agent-listen-port={ports[6]}", f"--dashboard-agent-grpc-port={ports[7]}",
            f"--runtime-env-agent-port={ports[8]}",
        ]  # fmt: skip
        with (self.temp_dir / "ray-start.log").open("wb") as log:
            self.process = subprocess.Popen(
                command, env=env, cwd=self.temp_dir, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _worker_ports(self) -> tuple[int, int]:
        # a band of ports for this cluster's workers, away from the ephemeral range
        base = 20000 + (self.port % 200) * 100
        return base, base + 99

    def log_tail(self, chars: int = 3000) -> str:
        log = self.temp_dir / "ray-start.log" if self.temp_dir else None
        return log.read_text(errors="replace")[-chars:] if log and log.exists() else ""

    def _wait_ready(self) -> None:
        """Until a raylet of this cluster runs and `ray start` reports the node started."""

        def started() -> bool:
            names = {p.name() for p in self._processes() if _safe(p.name)}
            return (
                "Ray runtime started" in self.log_tail(100_000)
                and {"raylet", "gcs_server"} <= names
            )

        wait_until(
            self.process,
            started,
            "ray start",
            "the cluster started",
            self.start_timeout,
            self.log_tail,
            0.5,
        )

    def _processes(self) -> list[psutil.Process]:
        """Every live process of this cluster: descendants of `ray start` and any process whose
        command line names this cluster's temp dir or GCS address (orphans re-parented to init)."""
        found = {p.pid: p for p in descendants(self.pid)} if self.process else {}
        marks = [str(self.temp_dir), f"{HOST}:{self.port}", f"--gcs-address={HOST}:{self.port}"]
        for process in psutil.process_iter(["pid", "cmdline"]):
            cmdline = " ".join(process.info.get("cmdline") or [])
            if process.pid != os.getpid() and any(mark in cmdline for mark in marks):
                found.setdefault(process.pid, process)
        found.pop(self.pid if self.process else -1, None)
        return list(found.values())

    def stop(self) -> None:
        """SIGTERM to `ray start`, then SIGKILL by id to every process of the cluster still alive;
        raises if any survives. Removes the temp dir."""
        try:
            if self.process is not None:
                left = stop_processes(
                    self.process, self._processes(), signal.SIGTERM, self.stop_timeout
                )
                stragglers = self._processes()  # started while stopping
                for process in stragglers:
                    with contextlib.suppress(psutil.Error):
                        process.kill()
                _, alive = psutil.wait_procs(stragglers, timeout=self.stop_timeout)
                left += [p.pid for p in alive]
                if left:
                    raise RuntimeError(f"ray processes {sorted(set(left))} outlived SIGKILL")
        finally:
            if self.temp_dir is not None:
                shutil.rmtree(self.temp_dir, ignore_errors=True)


def _safe(getter) -> bool:
    try:
        getter()
    except psutil.Error:
        return False
    return True
