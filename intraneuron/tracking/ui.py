"""Links into MLflow's web UI that open on the runs table, not on the GenAI traces page.

MLflow 3's UI picks an experiment's landing page from a workflow switch (GenAI or model training):
the `workflowType` query parameter when the link has one, else the browser's last choice, which
starts as GenAI. A link that names `workflowType=machine_learning` lands on the runs table in any
browser. (The `mlflow.experimentKind` tag that `store.open_experiment` sets is what UIs without
the switch read instead.)

Only string formatting here: no mlflow import.
"""

from __future__ import annotations

from urllib.parse import urlparse

DEFAULT_UI = "http://127.0.0.1:5000"  # where `mlflow ui` listens unless told otherwise
_WORKFLOW = "workflowType=machine_learning"


def ui_base(tracking_uri: str, default: str = DEFAULT_UI) -> str:
    """The UI's address: an http(s) tracking server serves its own UI; a database needs `mlflow ui`."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme in ("http", "https") and parsed.netloc:
        netloc = parsed.netloc.rpartition("@")[2]  # credentials stay out of printed links and files
        return f"{parsed.scheme}://{netloc}{parsed.path.rstrip('/')}"
    return default.rstrip("/")


def experiment_url(tracking_uri: str, experiment_id: str, default: str = DEFAULT_UI) -> str:
    """The experiment's runs table."""
    return f"{ui_base(tracking_uri, default)}/#/experiments/{experiment_id}/runs?{_WORKFLOW}"


def run_url(tracking_uri: str, experiment_id: str, run_id: str, default: str = DEFAULT_UI) -> str:
    """One run's page (overview, metrics, system metrics, artifacts)."""
    return f"{ui_base(tracking_uri, default)}/#/experiments/{experiment_id}/runs/{run_id}?{_WORKFLOW}"
