"""Links into MLflow's web UI that open on the runs table, not on the GenAI traces page.

MLflow 3's UI picks an experiment's landing page from a workflow switch (GenAI or model training):
the `workflowType` query parameter when the link has one, else the browser's last choice, which
starts as GenAI. A link that names `workflowType=machine_learning` lands on the runs table in any
browser. (The `mlflow.experimentKind` tag that `store.open_experiment` sets is what UIs without
the switch read instead.) An experiment's link also names its saved view (`view.py`), so the table
opens on the headline metrics, sorted by the main one.

Only string formatting here: no mlflow import.
"""

from __future__ import annotations

from urllib.parse import urlparse

DEFAULT_UI = "http://127.0.0.1:5000"  # where `intraneuron ui` (and `mlflow ui`) listen unless told otherwise
VIEW_KEY = "intraneuron-headline"  # the saved view's key in links and in its experiment tag
_WORKFLOW = "workflowType=machine_learning"


def ui_base(tracking_uri: str, default: str = DEFAULT_UI) -> str:
    """The UI's address: an http(s) tracking server serves its own UI; a database needs `intraneuron ui`."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme in ("http", "https") and parsed.netloc:
        netloc = parsed.netloc.rpartition("@")[2]  # credentials stay out of printed links and files
        return f"{parsed.scheme}://{netloc}{parsed.path.rstrip('/')}"
    return default.rstrip("/")


def experiment_url(tracking_uri: str, experiment_id: str, default: str = DEFAULT_UI, view: bool = True) -> str:
    """The experiment's runs table, opened on its saved view (unless `view` is false)."""
    shared = f"&viewStateShareKey={VIEW_KEY}" if view else ""
    return f"{ui_base(tracking_uri, default)}/#/experiments/{experiment_id}/runs?{_WORKFLOW}{shared}"


def run_url(tracking_uri: str, experiment_id: str, run_id: str, default: str = DEFAULT_UI) -> str:
    """One run's page (overview, metrics, system metrics, artifacts)."""
    return f"{ui_base(tracking_uri, default)}/#/experiments/{experiment_id}/runs/{run_id}?{_WORKFLOW}"


def ui_command(tracking_uri: str) -> str | None:
    """The command that serves a database store's UI at DEFAULT_UI; None for a server, which serves its own."""
    if urlparse(tracking_uri).scheme in ("http", "https"):
        return None
    return f"intraneuron ui --tracking-uri {tracking_uri}"


def browse(tracking_uri: str, experiment_id: str) -> str:
    """What to do to see the experiment: serve the store's UI and open the link, or open the link."""
    link = experiment_url(tracking_uri, experiment_id)
    command = ui_command(tracking_uri)
    return f"{command}, then open {link}" if command else f"open {link}"
