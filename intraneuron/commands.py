"""`intraneuron compare`, `show`, `stale`, `merge` and `ui`: read results back from MLflow.

    intraneuron compare <parent run id | experiment> [--tracking-uri URI] [--out DIR]
    intraneuron show <run id> [--neuron N [--layer L] [--out FILE]] [--tracking-uri URI]
    intraneuron stale [--tracking-uri URI] [--experiment NAME] [--mark]
    intraneuron merge <parent run id | sweep folder> [--allow-gaps] [--tracking-uri URI]
    intraneuron ui [--tracking-uri URI] [--port N]      # MLflow's web UI (ui_server.py)

Plain argparse, not Hydra: these read a store (`merge` also writes the merged layers back), they
configure no job. Every failure the user can fix (an unknown run, experiment, layer or neuron, a
malformed run id, an unwritable --out, a store that is not there, is down or is no MLflow store) is
one line on stderr and exit status 1. The store is checked first, in seconds, by the jobs' own
pre-flight (`tracking.preflight`): MLflow's client retries a server that is down for minutes.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

from intraneuron.command_checks import check_out, checked_store
from intraneuron.tracking.redact import redact

COMMANDS = ("compare", "show", "stale", "merge", "ui")
PROG = "intraneuron"
_NOTE_TAGS = ("analysis", "layer", "hydra.overrides", "mlflow.parentRunId", "error")
_NOTE_PARAMS = ("analysis._target_", "model.name", "layer")


class CommandError(Exception):
    """A one-line reason to exit 1."""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    from intraneuron.errors import ConfigError, NotFound

    try:
        writes = args.command == "merge" or getattr(args, "mark", False)
        args.tracking_uri = checked_store(args.tracking_uri, writes=writes)  # before MLflow is imported
        from intraneuron.reports.artifacts import quiet_downloads

        with quiet_downloads():
            return args.handler(args)
    except (CommandError, ConfigError, NotFound) as error:
        print(redact(f"{PROG} {args.command}: {error}"), file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Read results back from MLflow.")
    commands = parser.add_subparsers(dest="command", required=True)
    uri_help = ("MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db; "
                "a relative sqlite path is relative to the current directory)")  # fmt: skip

    compare = commands.add_parser("compare", help="a sweep's child runs, or an experiment's runs, side by side")
    compare.add_argument("target", help="a sweep's parent run id, or an experiment name (or id)")
    compare.add_argument("--tracking-uri", help=uri_help)
    compare.add_argument("--out", type=Path, help="folder for summary.csv, summary.html and figures "
                         "(default: ./compare-<id or name>/)")  # fmt: skip
    compare.set_defaults(handler=compare_command)

    show = commands.add_parser("show", help="one run: what it ran and its headline metrics")
    show.add_argument("run_id")
    show.add_argument("--neuron", type=int, help="print this neuron's row of the neurons table and write its card")
    show.add_argument("--layer", type=int, help="with --neuron: only this layer (default: every layer of the run)")
    show.add_argument("--out", type=Path, help="with --neuron: the card's file (default: ./card-<run>-L<l>-N<n>.html); "
                      "a card the run did not log is rebuilt from the run's config")  # fmt: skip
    show.add_argument("--tracking-uri", help=uri_help)
    show.set_defaults(handler=show_command)

    stale = commands.add_parser("stale", help="RUNNING runs whose process is gone (SIGKILL, OOM killer, reboot)")
    stale.add_argument("--tracking-uri", help=uri_help)
    stale.add_argument("--experiment", help="only this experiment (name or id; default: every experiment)")
    stale.add_argument("--mark", action="store_true", help="end the runs whose process is gone as KILLED, "
                       "with the reason as their description")  # fmt: skip
    stale.set_defaults(handler=stale_command)

    merge = commands.add_parser("merge", help="merge a sweep's shard runs (neuron ranges of a layer) into whole layers")
    merge.add_argument("target", help="the sweep's parent run id, or its sweep folder (holding mlflow_parent_run_id)")
    merge.add_argument("--allow-gaps", action="store_true", help="merge a layer whose shards leave neurons out")
    merge.add_argument("--tracking-uri", help=uri_help)
    merge.set_defaults(handler=merge_command)
    from intraneuron.ui_server import add_parser
    add_parser(commands, uri_help)
    return parser


def merge_command(args: argparse.Namespace) -> int:
    """Merge the shard runs under a sweep's parent into whole layers (intraneuron/merge.py): logged to
    the parent when the sweep ran one config, else to one "merged: ..." child run per config."""
    from intraneuron.analyses.base import ShardMergeError
    from intraneuron.merge import merge_sweep, parent_run_id
    from intraneuron.reports.compare import get_run

    client = _client(args.tracking_uri)
    try:
        parent_id = parent_run_id(args.target)
        get_run(client, parent_id, argument="target")
        merged = merge_sweep(client, parent_id, allow_gaps=args.allow_gaps)
    except ShardMergeError as error:
        raise CommandError(str(error)) from None
    print(f"{len(merged)} layers merged; `{PROG} show {merged[0].run_id}` prints them")
    return 0


def compare_command(args: argparse.Namespace) -> int:
    from intraneuron.errors import ConfigError, NotFound
    from intraneuron.reports.compare import (
        experiment_table,
        file_safe,
        find_experiment,
        get_run,
        sweep_table,
        write_summary,
    )  # fmt: skip
    from intraneuron.reports.terminal import compare_text

    out = args.out if args.out is not None else Path(f"compare-{file_safe(args.target)}")
    check_out(args.out, out)
    client = _client(args.tracking_uri)
    try:
        run = get_run(client, args.target, argument="target")
    except (NotFound, ConfigError):  # not a run (or not even a run id): try it as an experiment
        run = None
    if run is not None:
        table = sweep_table(client, args.target)
        if table.empty:
            raise CommandError(f"run {args.target} has no child runs (not a sweep's parent); "
                               f"`{PROG} show {args.target}` prints it")  # fmt: skip
        title = f"Sweep {run.info.run_name} ({args.target})"
    else:
        experiment = find_experiment(client, args.target)
        if experiment is None:
            raise NotFound(f"no run or experiment {args.target!r} in {client.tracking_uri}")
        table = experiment_table(client, experiment.experiment_id)
        if table.empty:
            raise CommandError(f"experiment {experiment.name!r} has no runs with headline metrics")
        title = f"Experiment {experiment.name}"
    print(title)
    # a terminal gets the table fitted to its width; a pipe or a file all of it, one line per row
    print(compare_text(table, shutil.get_terminal_size().columns if sys.stdout.isatty() else None))
    paths = write_summary(table, out, title)
    print(f"\n{len(paths)} files in {out}/: summary.csv, summary.html, {len(paths) - 2} figures")
    return 0


def show_command(args: argparse.Namespace) -> int:
    from intraneuron.reports.compare import get_run

    if args.neuron is not None:  # the card goes into --out, a file in its folder, or the current folder
        out = args.out or Path()
        check_out(args.out, out if out.is_dir() else out.parent)
    client = _client(args.tracking_uri)
    run = get_run(client, args.run_id)
    tags, params = run.data.tags, run.data.params
    if args.neuron is not None:
        return _show_neuron(client, run, args.neuron, args.layer, args.out)
    print(f"run: {run.info.run_name} ({run.info.run_id})")
    print(f"status: {run.info.status}")
    description = tags.get("mlflow.note.content", "").strip()
    if description:
        print("description: " + description.replace("\n", "\n  "))
    for key in _NOTE_PARAMS:
        if key in params:
            print(f"{key}: {params[key]}")
    for key in _NOTE_TAGS:
        if key in tags and key not in params:
            print(f"{key}: {tags[key]}")
    for layer in _layers(run):
        prefix = f"L{layer}/"
        metrics = {k.removeprefix(prefix): v for k, v in run.data.metrics.items() if k.startswith(prefix)}
        if metrics:
            print(f"layer {layer}:")
            for name in _headline_order(run, metrics):
                print(f"  {name}: {_headline_value(run, layer, name, float(metrics[name]))}")
    return 0


def _headline_value(run, layer: int, name: str, value: float) -> str:
    """A headline metric's value; a NaN one with its reason (the run's `reason.L<l>/<name>` tag)."""
    from intraneuron.reports.artifacts import reason_tag
    from intraneuron.reports.compare import format_value

    if value == value:
        return format_value(value)
    reason = run.data.tags.get(reason_tag(layer, name))
    return f"nan ({reason})" if reason else "nan"


def _show_neuron(client, run, neuron: int, layer: int | None, out: Path | None) -> int:
    from mlflow.exceptions import MlflowException

    from intraneuron.reports.artifacts import load_table

    layers = _layers(run)
    if layer is not None and layer not in layers:
        raise CommandError(f"run {run.info.run_id} has no layer {layer} (its layers: {_listed(layers)})")
    found = False
    for l in [layer] if layer is not None else layers:
        try:
            table = load_table(client, run.info.run_id, l, "neurons")
        except MlflowException:
            continue  # a FAILED run, or an analysis without a neurons table
        rows = table[table["neuron"] == neuron] if "neuron" in table else table.iloc[0:0]
        for _, row in rows.iterrows():
            if found:
                print()
            found = True
            for key, value in row.items():
                print(f"{key}: {_full(value)}")
            path = out if out is not None and layer is not None else _card_file(out, run, l, neuron)
            print(f"card: {write_card(client, run, l, neuron, table, path)}")
    if not found:
        where = f"layer {layer}" if layer is not None else f"layers {_listed(layers)}"
        raise CommandError(f"neuron {neuron} is not in the neurons table of run {run.info.run_id}, {where}")
    return 0


def _card_file(out: Path | None, run, layer: int, neuron: int) -> Path:
    name = f"card-{run.info.run_id[:8]}-L{layer}-N{neuron}.html"
    if out is None:
        return Path(name)
    return out / name if out.is_dir() else out.with_name(f"{out.stem}-L{layer}{out.suffix}")


def write_card(client, run, layer: int, neuron: int, table, path: Path) -> Path:
    """The neuron's card at `path`: the run's own when it logged one, else rebuilt from the run's
    composed config (model and corpus loaded again; the extraction read from the cache if here)."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from intraneuron.reports.artifacts import COMPOSED_CONFIG, card_path

    path.parent.mkdir(parents=True, exist_ok=True)
    run_id, uri = run.info.run_id, client.tracking_uri
    try:
        logged = download_artifacts(run_id=run_id, artifact_path=card_path(layer, neuron), tracking_uri=uri)
    except (MlflowException, OSError):
        logged = None
    if logged is not None:
        shutil.copyfile(logged, path)
        return path
    try:
        config = download_artifacts(run_id=run_id, artifact_path=COMPOSED_CONFIG, tracking_uri=uri)
    except (MlflowException, OSError):
        raise CommandError(f"run {run_id} logged no card of neuron {neuron} and no {COMPOSED_CONFIG} "
                           "to rebuild it from") from None  # fmt: skip
    import yaml
    from omegaconf import OmegaConf

    from intraneuron.reports.card_html import render_card
    from intraneuron.runner import neuron_cards

    print(f"(run {run_id[:8]} logged no card of L{layer} N{neuron}: rebuilding it from its config)", file=sys.stderr)
    cfg = OmegaConf.create(yaml.safe_load(Path(config).read_text()))
    (card,) = neuron_cards(cfg, layer, [neuron], table)
    path.write_text(render_card(card, index_href=None), encoding="utf-8")
    return path


def stale_command(args: argparse.Namespace) -> int:
    """List RUNNING runs with what became of their process; `--mark` ends the gone ones KILLED.

    A run's process is known by its `intraneuron.host` and `intraneuron.pid` tags. Only a process on
    this host can be checked: runs of other hosts, and runs without those tags, are listed as unknown
    and never marked.
    """
    import socket

    from mlflow.entities import RunStatus, RunTag
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

    from intraneuron.reports.compare import find_experiment
    from intraneuron.tracking.run import HOST_TAG, PID_TAG
    from intraneuron.tracking.server import pid_alive

    client = _client(args.tracking_uri)
    if args.experiment is not None:
        experiment = find_experiment(client, args.experiment)
        if experiment is None:
            raise CommandError(f"no experiment {args.experiment!r} in {client.tracking_uri}")
        experiment_ids = [experiment.experiment_id]
    else:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    runs = _running_runs(client, experiment_ids)
    here = socket.gethostname()
    gone = marked = 0
    for run in runs:
        tags = run.data.tags
        host, pid = tags.get(HOST_TAG), tags.get(PID_TAG, "")
        name = f"{run.info.run_id} {run.info.run_name or ''}".rstrip()
        if host is None or not pid.isdigit():
            print(f"unknown  {name}: no {HOST_TAG}/{PID_TAG} tags")
        elif host != here:
            print(f"unknown  {name}: process {pid} on {host}, not this host")
        elif pid_alive(int(pid)):
            print(f"running  {name}: process {pid} on {host} is alive")
        else:
            gone += 1
            reason = f"process {pid} on {host} is gone (killed without a chance to close the run)"
            if args.mark:
                previous = tags.get(MLFLOW_RUN_NOTE, "").strip()
                note = f"{reason}\n\n{previous}" if previous else reason
                client.log_batch(run.info.run_id, tags=[RunTag("error", reason), RunTag(MLFLOW_RUN_NOTE, note)])
                client.set_terminated(run.info.run_id, status=RunStatus.to_string(RunStatus.KILLED))
                marked += 1
                print(f"KILLED   {name}: {reason}")
            else:
                print(f"gone     {name}: {reason}")
    summary = f"{len(runs)} RUNNING runs in {redact(client.tracking_uri)}; {gone} of them with their process gone"
    if gone and args.mark:
        summary += f", {marked} marked KILLED"
    elif gone:
        summary += f" (`{PROG} stale --mark` ends them KILLED)"
    print(summary)
    return 0


def _running_runs(client, experiment_ids: list[str]) -> list:
    if not experiment_ids:
        return []
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string="attributes.status = 'RUNNING'",
                                  max_results=1000, page_token=token)  # fmt: skip
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _client(uri: str):
    """An MlflowClient of a store `checked_store` has checked."""
    from mlflow import MlflowClient

    return MlflowClient(uri)


def _layers(run) -> list[int]:
    from_metrics = {int(m.group(1)) for k in run.data.metrics if (m := re.match(r"L(\d+)/", k))}
    from_tag = {int(t) for t in re.findall(r"\d+", run.data.tags.get("layer", ""))}
    return sorted(from_metrics | from_tag)


def _headline_order(run, metrics: dict) -> list[str]:
    from intraneuron.reports.artifacts import HEADLINE_TAG

    order = [n for n in run.data.tags.get(HEADLINE_TAG, "").split(",") if n in metrics]
    return order + sorted(set(metrics) - set(order))


def _full(value) -> str:
    """A neuron-table cell: numbers to 6 significant digits (the table has them in full)."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _listed(layers: list[int]) -> str:
    return ", ".join(map(str, layers)) or "none"
