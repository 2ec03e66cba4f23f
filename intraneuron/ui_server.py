"""`intraneuron ui`: MLflow's web UI over the project's store, opened on each experiment's saved view.

    intraneuron ui [--tracking-uri URI] [--port N]

Starts `mlflow server` on 127.0.0.1 (`tracking.server.LocalMlflowServer`: one worker, no job
runner, its own process group), waits until /health answers, prints each experiment's link (the
project's own opened on their saved view of the headline metrics, brought up to date first:
`tracking.view`), then serves until Ctrl-C or SIGTERM, which stop the server's whole process group. The store is the jobs' own: --tracking-uri,
else $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db of the current folder, with the artifact
folder beside the database. A bad port, a port in use, a store that is not there and a tracking
server (which serves its own UI) are one line on stderr and exit status 1, before anything starts.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from intraneuron.errors import ConfigError

DEFAULT_PORT = 5000  # the port of the links jobs print (tracking.ui.DEFAULT_UI)
# `mlflow server` on two busy cores has taken minutes to answer /health
START_TIMEOUT = 600.0


def add_parser(commands, uri_help: str) -> None:
    """The `ui` subcommand, among `intraneuron`'s others (commands.py)."""
    ui = commands.add_parser("ui", help="MLflow's web UI over the store, opened on each experiment's headline view")
    ui.add_argument("--tracking-uri", help=uri_help)
    ui.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port on 127.0.0.1 (default: {DEFAULT_PORT})")
    ui.set_defaults(handler=ui_command)


def check_port(port: int) -> None:
    """Refuse a port that is not one, or that another process listens on (ConfigError)."""
    if not 1 <= port <= 65535:
        raise ConfigError("--port", port, "a TCP port from 1 to 65535")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # as uvicorn binds: a port a stopped server left in TIME_WAIT is free to it
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            raise ConfigError("--port", port, f"a free port on 127.0.0.1 ({error.strerror}; try another --port)") from None


def ui_command(args: argparse.Namespace) -> int:
    from intraneuron.commands import CommandError
    from intraneuron.tracking import signals
    from intraneuron.tracking.server import LocalMlflowServer
    from intraneuron.tracking.store import TrackingConfig, resolve
    from intraneuron.tracking.ui import ui_command as serve_command

    uri = args.tracking_uri
    if serve_command(uri) is None:
        raise CommandError(f"{uri} is an MLflow server: it serves its own UI, open it in a browser")
    check_port(args.port)
    resolved = resolve(TrackingConfig(tracking_uri=uri), Path.cwd())
    server = LocalMlflowServer(uri, resolved.artifact_dir, port=args.port, start_timeout=START_TIMEOUT)
    print(f"starting mlflow server over {uri} on 127.0.0.1:{args.port} (Ctrl-C stops it) ...", flush=True)
    # both signals, even where SIGINT came ignored (started in the background by a script)
    signals.trap_stop_signals(lambda _name: None)
    try:
        try:
            server.start()
        except (RuntimeError, TimeoutError) as error:  # it exited or never answered; stopped already
            raise CommandError(str(error)) from None
        for line in _links(uri, server.url):
            print(line, flush=True)
        server.process.wait()  # until a signal, or the server dies by itself
        raise CommandError(f"mlflow server exited with {server.process.returncode}:\n{server.log_tail()}")
    except KeyboardInterrupt as caught:
        stop = caught
    finally:
        server.stop()  # the whole process group, or an error if any of it outlives SIGKILL
        signals.release_stop_signals()
    print(f"intraneuron ui: {signals.stopped(stop)}; mlflow server stopped", file=sys.stderr)
    return 143 if isinstance(stop, signals.Terminated) else 130  # the shell's 128 + signal number


def _links(uri: str, base: str) -> list[str]:
    """Each active experiment's link: the project's own (with a view, or with runs of an analysis
    from before the view) opened on its saved view, brought up to date first; others as they are."""
    from mlflow import MlflowClient

    from intraneuron.reports.artifacts import HEADLINE_TAG
    from intraneuron.tracking.ui import experiment_url
    from intraneuron.tracking.view import VIEW_TAG, save_view

    client = MlflowClient(uri)
    lines = [f"MLflow UI at {base}"]
    for experiment in client.search_experiments():
        eid = experiment.experiment_id
        ours = VIEW_TAG in experiment.tags or client.search_runs([eid], f"tags.`{HEADLINE_TAG}` LIKE '%'", max_results=1)
        if ours:
            save_view(client, eid, experiment.tags.get(VIEW_TAG))
        viewed = bool(ours) and VIEW_TAG in client.get_experiment(eid).tags
        lines.append(f"  experiment {experiment.name!r}: {experiment_url(base, eid, view=viewed)}")
    return lines
