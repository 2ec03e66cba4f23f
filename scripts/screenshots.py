"""The README's images, taken with headless Chromium (Debian's `chromium`, installed by setup.sh).

    python scripts/screenshots.py compare --parent RUN_ID [--tracking-uri URI] [--artifact NAME]
                                          --out docs/images/compare.png
    python scripts/screenshots.py compare --runs ID ID ... --out docs/images/compare.png
    python scripts/screenshots.py page FILE.html --out docs/images/card.png [--full]

`compare`: MLflow's Compare view of a sweep's child runs (or the given runs), with one root-level
figure (default: the first `L<layer>_homogeneity_by_segment.png`) previewed for every run side by
side. A database store is served by a local `mlflow server` on 127.0.0.1 for the duration; an
http(s) tracking URI is used as it is. The view previews an artifact only once it is picked in
its file list, so the picture is taken after clicking it (browser.capture).

`page`: an HTML file (a neuron card) as a PNG, offline: a resource it would fetch just fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from urllib.parse import quote, urlparse

from intraneuron.reports.browser import BrowserError, capture, screenshot
from intraneuron.tracking.server import LocalMlflowServer
from intraneuron.tracking.ui import ui_base

DEFAULT_URI = "sqlite:///mlruns/mlflow.db"
PARENT_TAG = "mlflow.parentRunId"
PREFERRED_FIGURE = "_homogeneity_by_segment.png"
# MLflow 3's UI: a run's file list node, and the assistant side panel's close button.
ARTIFACT_NODE = '[data-testid="artifact-tree-node"][artifact-name={name}]'
ASSISTANT_CLOSE = '[data-component-id="mlflow.assistant.chat_panel.close"]'


def compare_url(base: str, run_ids: list[str], experiment_ids: list[str]) -> str:
    """The Compare view (the route MLflow 3's UI builds: JSON lists in the hash's query)."""

    def listed(ids: list[str]) -> str:
        return quote(json.dumps(ids, separators=(",", ":")))

    return f"{base}/#/compare-runs?runs={listed(run_ids)}&experiments={listed(experiment_ids)}"


def absolute_sqlite(uri: str) -> str:
    """A relative sqlite path (sqlite:///mlruns/mlflow.db) resolved against the working directory,
    as the tracking config resolves it; the server runs elsewhere."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri.startswith(prefix + "/"):
        return uri
    path = Path(uri.removeprefix(prefix)).resolve()
    if not path.is_file():
        raise SystemExit(f"screenshots: no MLflow database at {path}")
    return f"{prefix}{path}"


def runs_to_compare(client, parent: str | None, run_ids: list[str]) -> list:
    if run_ids:
        return [client.get_run(run_id) for run_id in run_ids]
    experiment_id = client.get_run(parent).info.experiment_id
    children = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'",
        order_by=["attributes.start_time ASC"], max_results=50,
    )  # fmt: skip
    if not children:
        raise SystemExit(f"screenshots: run {parent} has no child runs")
    return children


def figure_to_show(client, runs: list, wanted: str | None) -> str:
    """The root-level PNG every run has: `wanted`, else a homogeneity figure, else the first."""
    common = None
    for run in runs:
        names = {f.path for f in client.list_artifacts(run.info.run_id) if f.path.endswith(".png")}
        common = names if common is None else common & names
    if wanted:
        if wanted not in common:
            raise SystemExit(f"screenshots: not every run has {wanted}; common: {sorted(common)}")
        return wanted
    if not common:
        raise SystemExit("screenshots: the runs have no root-level .png artifact in common")
    preferred = sorted(n for n in common if n.endswith(PREFERRED_FIGURE))
    return (preferred or sorted(common))[0]


def take_compare(args: argparse.Namespace) -> Path:
    from mlflow import MlflowClient  # slow import, only for this command

    uri = absolute_sqlite(args.tracking_uri)
    client = MlflowClient(uri)
    runs = runs_to_compare(client, args.parent, args.runs)
    figure = figure_to_show(client, runs, args.artifact)
    run_ids = [r.info.run_id for r in runs]
    experiment_ids = sorted({r.info.experiment_id for r in runs})
    print(f"comparing {len(runs)} runs on {figure}: {', '.join(run_ids)}")
    if urlparse(uri).scheme in ("http", "https"):
        return _shoot(compare_url(ui_base(uri), run_ids, experiment_ids), figure, args)
    store = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:") else Path.cwd()
    with LocalMlflowServer(uri, store / "artifacts", cwd=store) as server:
        return _shoot(compare_url(server.url, run_ids, experiment_ids), figure, args)


def _shoot(url: str, figure: str, args: argparse.Namespace) -> Path:
    local = urlparse(url).hostname in ("127.0.0.1", "localhost")
    return capture(
        url, args.out, clicks=[ARTIFACT_NODE.format(name=json.dumps(figure))],
        dismiss=[ASSISTANT_CLOSE], crop_to=f"img[alt={json.dumps(figure)}]",
        size=(args.width, args.height), timeout=args.timeout, offline=local,
    )  # fmt: skip


def take_page(args: argparse.Namespace) -> Path:
    size = (args.width, args.height)
    if args.full:  # the whole page, however long: down to the bottom of <body>
        return capture(args.file, args.out, crop_to="body", size=size, timeout=args.timeout)
    return screenshot(args.file, args.out, size=size, timeout=args.timeout)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = top.add_subparsers(dest="command", required=True)
    compare = commands.add_parser("compare", help="MLflow's Compare view of a sweep's runs")
    which = compare.add_mutually_exclusive_group(required=True)
    which.add_argument("--parent", help="the sweep's parent run id: compare its child runs")
    which.add_argument("--runs", nargs="+", default=[], help="run ids to compare")
    compare.add_argument("--tracking-uri", default=DEFAULT_URI)
    compare.add_argument("--artifact", help="the root-level PNG to preview (default: homogeneity)")
    compare.set_defaults(take=take_compare)
    page = commands.add_parser("page", help="an HTML file (a neuron card) as a PNG")
    page.add_argument("file", type=Path)
    page.add_argument("--full", action="store_true", help="the whole page, not just the viewport")
    page.set_defaults(take=take_page)
    for command, (width, height) in ((compare, (1600, 1200)), (page, (1200, 900))):
        command.add_argument("--out", type=Path, required=True, help="the PNG to write")
        command.add_argument("--width", type=int, default=width, help="viewport, CSS pixels")
        command.add_argument("--height", type=int, default=height, help="viewport, CSS pixels")
        command.add_argument("--timeout", type=float, default=120.0, help="seconds")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        out = args.take(args)
    except BrowserError as error:
        print(f"screenshots: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
