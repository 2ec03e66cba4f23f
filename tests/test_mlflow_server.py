"""A shared `mlflow server` over the store of a real two-job sweep: what its REST API serves, and
what its UI shows at the experiment's link the sweep printed.

The sweep (ward vs kmeans on layer 0) is launched through the CLI into `store/mlflow.db`, with its
artifacts under `store/artifacts/`; `mlflow server` is started on 127.0.0.1 on a free port over
that store and stopped by its process id. Everything is read over plain HTTP (REST API 2.0 and the
server's artifact download), the way the UI and remote clients see it, and the runs table in
headless Chromium (skipped without it, except on CI).
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest

from intraneuron.reports import browser
from intraneuron.reports.artifacts import HEADLINE_TAG, MAIN_HEADLINE_TAG, figure_path, layer_metric
from intraneuron.tracking.server import LocalMlflowServer, group_alive, pid_alive
from intraneuron.tracking.store import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
from intraneuron.tracking.ui import DEFAULT_UI
from tests.test_runner import BASE, launch

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NOTE = "mlflow.note.content"
PARENT = "mlflow.parentRunId"
LAYER = 0
FIGURES = ("homogeneity_by_segment", "neuron_distributions", "top_segment_p_values")

# Requests go straight to 127.0.0.1, whatever proxy the environment names.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Server(LocalMlflowServer):
    """The shared server over the sweep's store, read through REST API 2.0."""

    def __init__(self, store: Path, log: Path):
        super().__init__(f"sqlite:///{store / 'mlflow.db'}", store / "artifacts", log)

    # ------------------------------------------------------------ REST API 2.0

    def get(self, endpoint: str, **params: str) -> dict:
        query = urllib.parse.urlencode(params)
        with _HTTP.open(f"{self.url}/api/2.0/mlflow/{endpoint}?{query}", timeout=30) as response:
            return json.load(response)

    def post(self, endpoint: str, body: dict) -> dict:
        request = urllib.request.Request(
            f"{self.url}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"}, method="POST",
        )  # fmt: skip
        with _HTTP.open(request, timeout=30) as response:
            return json.load(response)

    def artifacts(self, run_id: str, path: str | None = None) -> dict[str, dict]:
        """Artifact path -> entry (is_dir, file_size) of one folder of a run."""
        params = {"run_id": run_id} if path is None else {"run_id": run_id, "path": path}
        listing = self.get("artifacts/list", **params)
        return {entry["path"]: entry for entry in listing.get("files", [])}

    def download(self, run_id: str, path: str) -> bytes:
        query = urllib.parse.urlencode({"path": path, "run_uuid": run_id})
        with _HTTP.open(f"{self.url}/get-artifact?{query}", timeout=30) as response:
            return response.read()


def pairs(entries: list[dict] | None) -> dict[str, str]:
    """A REST list of {key, value} (tags, params) as a dict."""
    return {entry["key"]: entry["value"] for entry in entries or []}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """The `store/` folder (mlflow.db, artifacts/) of one ward-vs-kmeans sweep on layer 0."""
    cwd = tmp_path_factory.mktemp("server_sweep")
    # a random tiny model has no categories (gap: K = 1) and weakly selective neurons: K >= 2 by
    # silhouette and no selectivity floor give every card its category figures
    done = launch(cwd, "--multirun", "clustering=ward,kmeans", "clustering.k_choice=silhouette",
                  "core_tokens.min_selectivity=0", f"layer={LAYER}", base=BASE)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (cwd / "store" / "mlflow.db").is_file() and (cwd / "store" / "artifacts").is_dir()
    (cwd / "sweep.out").write_text(done.stdout + done.stderr)  # what the sweep printed
    return cwd / "store"


@pytest.fixture(scope="module")
def server(store):
    server = Server(store, store.parent / "server.log")
    try:
        server.start()
        yield server
    finally:
        server.stop()
    assert not pid_alive(server.pid) and not group_alive(server.pid), (
        "mlflow server outlived its teardown"
    )


@pytest.fixture(scope="module")
def sweep(server) -> tuple[dict, dict, list[dict]]:
    """(experiment, parent run, child runs) as the REST API returns them."""
    experiment = server.get("experiments/get-by-name", experiment_name="e2e")["experiment"]
    found = server.post(
        "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100}
    )
    runs = found.get("runs", [])
    parents = [r for r in runs if PARENT not in pairs(r["data"].get("tags"))]
    assert len(parents) == 1, [r["info"]["run_name"] for r in runs]
    children = [r for r in runs if r is not parents[0]]
    return experiment, parents[0], children


def test_the_experiment_holds_the_parent_and_its_two_finished_children(sweep):
    experiment, parent, children = sweep
    assert experiment["name"] == "e2e" and experiment["lifecycle_stage"] == "active"
    assert (
        pairs(experiment.get("tags"))[EXPERIMENT_KIND_TAG]
        == EXPERIMENT_KIND
        == "custom_model_development"
    )
    parent_id = parent["info"]["run_id"]
    assert len(children) == 2
    assert {pairs(c["data"]["tags"])[PARENT] for c in children} == {parent_id}
    assert [r["info"]["status"] for r in (parent, *children)] == ["FINISHED"] * 3
    assert all(
        r["info"]["experiment_id"] == experiment["experiment_id"] for r in (parent, *children)
    )
    assert sorted(pairs(c["data"]["params"])["clustering.estimator._target_"] for c in children) == [
        "sklearn.cluster.AgglomerativeClustering", "sklearn.cluster.KMeans"]  # fmt: skip


def test_the_parent_serves_the_sweep_summary(server, sweep):
    _, parent, _ = sweep
    summary = server.artifacts(parent["info"]["run_id"], "sweep_summary")
    assert {"sweep_summary/summary.html", "sweep_summary/summary.csv"} <= set(summary)
    figures = [p for p in summary if p.endswith(".png")]
    assert figures and all(
        p.startswith("sweep_summary/") and "/" not in p.removeprefix("sweep_summary/")
        for p in figures
    )
    assert all(not summary[p]["is_dir"] and int(summary[p]["file_size"]) > 0 for p in summary)
    assert "sweep_summary" in server.artifacts(parent["info"]["run_id"])


def test_each_child_has_its_figures_at_the_artifact_root(server, sweep):
    _, _, children = sweep
    expected = {figure_path(LAYER, name) for name in FIGURES}
    assert expected == {f"L{LAYER}_{name}.png" for name in FIGURES}
    for child in children:
        root = server.artifacts(child["info"]["run_id"])
        assert expected <= set(root), sorted(root)
        assert all(not root[p]["is_dir"] and int(root[p]["file_size"]) > 0 for p in expected)
        assert root.get(f"layer_{LAYER}", {}).get("is_dir")  # the tables stay in the layer's folder


# The card the UI's artifact view shows in its (sandboxed) iframe: the page behind the frame's blob
# URL, fetched by the UI's own page and parsed by the browser; its promoted and suppressed tokens.
SERVED_CARD = """(() => {
  const frame = document.querySelector('iframe.mlflow-html-iframe');
  if (!frame || !frame.src) return null;
  if (window.__card === undefined) {
    window.__card = null;
    fetch(frame.src).then(r => r.text()).then(t => { window.__card = t; });
  }
  if (!window.__card) return null;
  const doc = new DOMParser().parseFromString(window.__card, 'text/html');
  const values = side => [...doc.querySelectorAll(`#logits .${side} span.logit`)].map(e => Number(e.dataset.logit));
  return {heading: doc.querySelector('#logits h2').firstChild.textContent.trim(),
          promoted: values('promoted'), suppressed: values('suppressed'),
          texts: [...doc.querySelectorAll('#logits span.logit')].map(e => e.textContent.trim()),
          lowest: doc.querySelectorAll('#lowest .context').length};
})()"""


def test_each_child_serves_its_neuron_cards_and_their_figures(server, sweep):
    """The default report: 3 top + 2 random neurons of the layer, each with a card under cards/
    linked from cards/index.html and its own figures at the root; in headless Chromium, the UI's
    artifact view of a card shows the tokens the neuron's output promotes and suppresses."""
    _, _, children = sweep
    for child in children:
        run_id = child["info"]["run_id"]
        cards = server.artifacts(run_id, "cards")
        pages = sorted(p for p in cards if re.fullmatch(rf"cards/L{LAYER}_N\d+\.html", p))
        assert len(pages) == 5 and "cards/index.html" in cards
        index = server.download(run_id, "cards/index.html").decode()
        assert all(f'href="{p.removeprefix("cards/")}"' in index for p in pages)
        root = server.artifacts(run_id)
        for page in pages:
            neuron = page.removeprefix(f"cards/L{LAYER}_N").removesuffix(".html")
            assert f"L{LAYER}_N{neuron}_activation_by_category.png" in root
        assert server.download(run_id, pages[0]).startswith(b"<!DOCTYPE html>")
    if browser.find_chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium on PATH: scripts/setup.sh should have installed Debian's chromium")
        pytest.skip("chromium is not installed (scripts/setup.sh installs it)")
    # the UI's artifact view of a card: the page its iframe shows, parsed by the browser
    child = children[0]
    page = sorted(p for p in server.artifacts(child["info"]["run_id"], "cards") if "_N" in p)[0]
    link = (f"{server.url}/#/experiments/{child['info']['experiment_id']}/runs/{child['info']['run_id']}"
            f"/artifacts/{page}")  # fmt: skip
    shown = browser.evaluate(link, SERVED_CARD, size=(1400, 900), timeout=240)
    assert shown["heading"].startswith("Output: tokens it promotes and suppresses")
    assert len(shown["promoted"]) == len(shown["suppressed"]) == 10
    assert shown["promoted"] == sorted(shown["promoted"], reverse=True) and shown["suppressed"] == sorted(shown["suppressed"])
    assert all(shown["texts"]) and shown["lowest"] == 4


def test_each_child_logs_exactly_its_declared_headline_metrics(sweep):
    _, _, children = sweep
    for child in children:
        tags = pairs(child["data"]["tags"])
        headline = tags[HEADLINE_TAG].split(",")
        assert headline and all(headline)
        keys = [m["key"] for m in child["data"].get("metrics", [])]
        # the headlines, and beside them only their companions: the pseudo-neurons' value, the
        # excess over it and the corpus intervals of the three
        companions = {f"{n}{part}{bound}" for n in headline for part in ("", "_pseudo", "_excess")
                      for bound in ("", "_ci_low", "_ci_high")}  # fmt: skip
        layer_keys = {k for k in keys if k.startswith(f"L{LAYER}/")}
        assert {layer_metric(LAYER, n) for n in headline} <= layer_keys
        assert layer_keys <= {layer_metric(LAYER, n) for n in companions}
        assert any(k.endswith("_excess") for k in layer_keys)  # (intervals: off in this sweep, BASE)
        # the other layer aggregates are in the summary table, not metrics
        assert not any(k.startswith("layer_") for k in keys)


def test_each_child_describes_its_headline_metrics(sweep):
    _, _, children = sweep
    for child in children:
        note = pairs(child["data"]["tags"])[NOTE]
        assert f"layer {LAYER}:" in note and "differentiated_frac=" in note


def test_a_figure_downloads_through_the_server(server, sweep):
    _, _, children = sweep
    child_id = children[0]["info"]["run_id"]
    path = figure_path(LAYER, "neuron_distributions")
    data = server.download(child_id, path)
    assert data.startswith(PNG_MAGIC)
    assert len(data) == int(server.artifacts(child_id)[path]["file_size"])


def test_a_stopped_server_leaves_no_process_behind(store):
    server = Server(store, store.parent / "server-stop.log")
    try:
        server.start()
        workers = [p.pid for p in psutil.Process(server.pid).children(recursive=True)]
        assert workers, "mlflow server answered /health without a worker process"
    finally:
        server.stop()
    assert server.process.returncode is not None
    assert not pid_alive(server.pid) and not group_alive(server.pid)
    assert not [pid for pid in workers if pid_alive(pid)]
    with pytest.raises(urllib.error.URLError):
        _HTTP.open(f"{server.url}/health", timeout=2)


# The runs table (an AG Grid) once the wanted columns and rows are there: its rows as
# {column key: cell text} (the pinned run-name cells and the scrolling cells share a row index),
# the column it is sorted by, and where each wanted column stands.
RUNS_TABLE = """(() => {
  const wanted = %s, headers = {}, rows = {};
  for (const h of document.querySelectorAll('.ag-header-cell[col-id]')) headers[h.getAttribute('col-id')] = h;
  for (const row of document.querySelectorAll('.ag-row[row-index]'))
    for (const cell of row.querySelectorAll('.ag-cell[col-id]'))
      (rows[row.getAttribute('row-index')] ??= {})[cell.getAttribute('col-id')] = cell.innerText.trim();
  const complete = Object.values(rows).filter(r => wanted.every(id => id in r));
  if (!wanted.every(id => id in headers) || complete.length < %d) return null;
  return {rows: complete,
          sortedBy: Object.keys(headers).filter(id => headers[id].querySelector('.is-ordered-by')),
          position: wanted.map(id => Number(headers[id].getAttribute('aria-colindex')))};
})()"""


def test_the_experiment_link_the_sweep_printed_opens_on_the_headline_metrics(server, sweep, store):
    if browser.find_chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium on PATH: scripts/setup.sh should have installed Debian's chromium")
        pytest.skip("chromium is not installed (scripts/setup.sh installs it)")
    experiment, parent, children = sweep
    printed = set(re.findall(r"Browse: intraneuron ui --tracking-uri \S+, then open (\S+)",
                             (store.parent / "sweep.out").read_text()))  # fmt: skip
    assert len(printed) == 1, printed  # every job of the sweep points at the same view
    link = printed.pop()
    assert link.startswith(f"{DEFAULT_UI}/#/experiments/{experiment['experiment_id']}/runs?")
    assert "viewStateShareKey=" in link

    tags = pairs(children[0]["data"]["tags"])
    headline = [layer_metric(LAYER, name) for name in tags[HEADLINE_TAG].split(",")]
    main = layer_metric(LAYER, tags[MAIN_HEADLINE_TAG])
    wanted = [f"metrics.`{key}`" for key in headline]
    table = browser.evaluate(
        link.replace(DEFAULT_UI, server.url), RUNS_TABLE % (json.dumps(wanted), 1 + len(children)),
        size=(4000, 900), timeout=240,
    )  # fmt: skip
    for child in children:
        name = child["info"]["run_name"]
        (row,) = [r for r in table["rows"] if name in r.get("attributes.`Run Name`", "").splitlines()]
        # the REST API writes a NaN metric (a headline whose null is too small) as the string "NaN"
        logged = {m["key"]: float(m["value"]) for m in child["data"]["metrics"]}
        shown = {key: float(row[f"metrics.`{key}`"]) for key in headline}
        assert shown == pytest.approx({key: logged[key] for key in headline}, rel=1e-9, nan_ok=True), name
    assert table["sortedBy"] == [f"metrics.`{main}`"]
    assert min(table["position"]) == table["position"][headline.index(main)]  # the main one comes first
