"""The experiment's saved view in MLflow's UI: its runs table opens on the headline metrics.

Left to itself, the runs table shows run name, creation time, dataset, duration and source: none of
the answers. MLflow's UI (3.17) opens the saved view a link names (`?viewStateShareKey=<key>`, see
`ui.py`) from the experiment tag `mlflow.sharedViewState.<key>`, the tags its "Views" menu lists and
its "Save as new view" writes. The tag holds an envelope {"name", "createdAt", "updatedAt" (ms),
"state"}, where `state` is the JSON text of the runs page's state: its UI fields (`selectedColumns`
and `columnOrder`, in MLflow's column keys metrics.`<key>` and params.`<key>`) and its search
facets (`orderByKey`, `orderByAsc`). A state too long for a tag is stored the way the UI compresses
it: "deflate;" and the base64 of its zlib stream. Sorted by a metric, the table also lists a sweep's
jobs flat (the UI nests child runs under their parent only when sorted by start time), so every
job's row shows its values.

The view selects the headline metrics of every analysis among the experiment's newest runs and the
params whose values differ between those runs (the columns `intraneuron compare` prints), sorted by
the newest run's main headline at its first layer, largest first, and shows that one first. The
experiment gets the view when it is opened, so a link printed before any run ended already opens it,
and it is brought up to date when a run or a sweep ends. It belongs to the project: a view of one's
own is saved under another name.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import zlib
from typing import Any

from intraneuron.reports.artifacts import HEADLINE_TAG, MAIN_HEADLINE_TAG
from intraneuron.tracking.ui import VIEW_KEY

log = logging.getLogger(__name__)

VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
VIEW_NAME = "Headline metrics"
# besides the run's name and start time (always shown): the corpus, then the job's duration; MLflow's
# other default columns (source script, logged models) say nothing here
SHOWN_COLUMNS = ("attributes.`Dataset`",)
# the grid places the columns `columnOrder` leaves out after those it names: it names them all
LEADING_COLUMNS = (*SHOWN_COLUMNS, "duration")
SCANNED_RUNS = 1000  # the newest runs a view is built from: one page of search_runs
_DEFLATE = "deflate;"


def column(kind: str, key: str) -> str:
    """MLflow UI's key of a runs-table column: column("metrics", "L0/x") -> "metrics.`L0/x`"."""
    return f"{kind}.`{key}`"


def view_state(runs: list) -> dict[str, Any]:
    """The runs page's state for `runs` (MLflow Run objects, newest first)."""
    from intraneuron.reports.compare import metric_columns, param_columns, runs_table

    analysed = [run for run in runs if HEADLINE_TAG in run.data.tags]  # sweep parents have none
    table = runs_table(analysed)
    metrics = metric_columns(table)  # by layer, each in its analysis's order
    main = _main_metric(analysed[0].data.tags, metrics) if analysed else None
    if main is not None:
        metrics = [main, *(m for m in metrics if m != main)]
    chosen = [*(column("metrics", m) for m in metrics), *(column("params", p) for p in param_columns(table))]
    state: dict[str, Any] = {"selectedColumns": [*SHOWN_COLUMNS, *chosen], "columnOrder": [*LEADING_COLUMNS, *chosen]}
    if main is not None:
        state.update(orderByKey=column("metrics", main), orderByAsc=False)
    return state


def _main_metric(tags: dict[str, str], metrics: list[str]) -> str | None:
    """The run's main headline at the first layer that has it, e.g. "L0/differentiated_frac"."""
    main = tags.get(MAIN_HEADLINE_TAG) or tags[HEADLINE_TAG].split(",")[0]  # runs from before the main tag
    return next((m for m in metrics if m.partition("/")[2] == main), None)


def envelope(state: dict[str, Any], created_ms: int, updated_ms: int, limit: int) -> str:
    """The tag's value: the state as plain JSON text, or compressed when the tag would be over `limit`."""
    text = json.dumps(state, separators=(",", ":"))

    def wrapped(state_text: str) -> str:
        return json.dumps({"name": VIEW_NAME, "createdAt": created_ms, "updatedAt": updated_ms, "state": state_text})

    value = wrapped(text)
    if len(value) > limit:
        value = wrapped(_DEFLATE + base64.b64encode(zlib.compress(text.encode())).decode())
    return value


def stored_state(value: str | None) -> tuple[dict[str, Any] | None, int | None]:
    """(state, createdAt) of a tag value; (None, None) for one that is missing or not an envelope."""
    try:
        stored = json.loads(value)
        text = stored["state"]
        if text.startswith(_DEFLATE):
            text = zlib.decompress(base64.b64decode(text.removeprefix(_DEFLATE))).decode()
        return json.loads(text), int(stored["createdAt"])
    except (TypeError, ValueError, KeyError, AttributeError, zlib.error):
        return None, None


def new_view() -> str:
    """The view of an experiment without runs: MLflow's default columns, newest run first."""
    from mlflow.utils.validation import MAX_EXPERIMENT_TAG_VAL_LENGTH

    now = int(time.time() * 1000)
    return envelope(view_state([]), now, now, MAX_EXPERIMENT_TAG_VAL_LENGTH)


def save_view(client, experiment_id: str, current: str | None = None) -> None:
    """Write the experiment's view from its newest runs, unless the stored one already says the
    same. `current`: the tag's value when the caller has the experiment at hand. Never raises: a
    view that cannot be written costs a warning, not the job."""
    from mlflow.utils.validation import MAX_EXPERIMENT_TAG_VAL_LENGTH

    try:
        runs = client.search_runs([experiment_id], max_results=SCANNED_RUNS, order_by=["attributes.start_time DESC"])
        state = view_state(list(runs))
        if current is None:
            current = client.get_experiment(experiment_id).tags.get(VIEW_TAG)
        stored, created = stored_state(current)
        if stored == state:
            return
        now = int(time.time() * 1000)
        value = envelope(state, created or now, now, MAX_EXPERIMENT_TAG_VAL_LENGTH)
        client.set_experiment_tag(experiment_id, VIEW_TAG, value)
    except Exception:  # the store or a race with another job: the next update writes it
        log.warning("could not save the headline view of MLflow experiment %s", experiment_id, exc_info=True)
