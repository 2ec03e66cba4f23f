"""Resuming a sweep: a multirun job whose config already FINISHED is not run again.

Every run is tagged with the hash of its resolved config minus how it runs (HOW_KEYS). A job of a
multirun (with `tracking.skip_finished`) looks for a FINISHED run with its hash in the experiment;
if there is one, that run is copied under the sweep's parent instead of being computed again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import RunStatus

from intraneuron.tracking.hydra_job import current_hydra_job, launch_dir
from intraneuron.tracking.run import PARENT_TAG, _end_run, record_failure, write_run_info
from intraneuron.tracking.store import TrackingConfig, open_experiment

log = logging.getLogger(__name__)

CONFIG_HASH_TAG = "intraneuron.config_hash"  # what the job computes; equal hashes, equal results
COPIED_FROM_TAG = "intraneuron.copied_from"  # a resumed sweep's copy of a FINISHED run: its id
# a FINISHED run with one of these tags ended without results on purpose (a corpus shard that left
# the merge to another job): resuming runs it again
INCOMPLETE_TAGS = frozenset({"intraneuron.extraction_shard_pending"})
_COPIED_MLFLOW_TAGS = ("mlflow.note.content", "mlflow.source.name", "mlflow.source.git.commit", "mlflow.user")
# Config keys that say how a job runs, not what it computes: left out of CONFIG_HASH_TAG.
HOW_KEYS = ("tracking", "extraction.batch_size", "extraction.device", "extraction.progress", "analysis.n_jobs")


def config_hash(config: Mapping[str, Any], how_keys: Sequence[str] = HOW_KEYS) -> str:
    """sha256 of the resolved config without the keys that say how it runs (`how_keys`, dotted)."""
    import copy
    import hashlib

    what = copy.deepcopy(dict(config))
    for dotted in how_keys:
        *path, leaf = dotted.split(".")
        node = what
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def finished_run(client: MlflowClient, experiment_id: str, digest: str) -> Any | None:
    """The latest FINISHED run of the experiment whose config hash is `digest` and that holds its
    results (not one that ended early on purpose, see INCOMPLETE_TAGS), or None."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{CONFIG_HASH_TAG}` = '{digest}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )
    return next((r for r in runs if not INCOMPLETE_TAGS & r.data.tags.keys()), None)


def resume_finished(tcfg: TrackingConfig, digest: str) -> str | None:
    """In a multirun with `tracking.skip_finished`: the id of this sweep's copy of a FINISHED run of
    this very config, or None when the job must run. The job's `mlflow_run.json` names the copy."""
    job = current_hydra_job()
    if job is None or not job.multirun or not tcfg.skip_finished:
        return None
    client, experiment_id = open_experiment(tcfg, launch_dir())
    done = finished_run(client, experiment_id, digest)
    if done is None:
        return None
    parent = job.parent_run_id()
    run_id = copy_run(client, done, parent)
    write_run_info(job, client, experiment_id, str(tcfg.experiment), run_id, done.info.run_name, parent)
    log.info(
        "skipped: this config already FINISHED as run %s (%s), copied under this sweep as run %s; "
        "tracking.skip_finished=false runs it again", done.info.run_id, done.info.run_name, run_id,
    )
    return run_id


def copy_run(client: MlflowClient, run: Any, parent: str | None) -> str:
    """A FINISHED copy of `run` (params, latest metrics, tags, artifacts) under `parent`, tagged
    COPIED_FROM_TAG. A copy, not a move: the sweep the run came from stays whole, and a sweep that is
    rerun (or started twice at once) still holds every one of its jobs."""
    import tempfile
    import time

    from mlflow.entities import Metric, Param

    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.") or k in _COPIED_MLFLOW_TAGS}
    tags[COPIED_FROM_TAG] = run.info.run_id
    if parent is not None:
        tags[PARENT_TAG] = parent
    copy = client.create_run(run.info.experiment_id, run_name=run.info.run_name, tags=tags).info.run_id
    try:
        client.log_batch(
            copy,
            params=[Param(k, v) for k, v in run.data.params.items()],
            metrics=[Metric(k, v, int(time.time() * 1000), 0) for k, v in run.data.metrics.items()],
        )
        with tempfile.TemporaryDirectory(prefix="intraneuron-copy-") as scratch:
            local = client.download_artifacts(run.info.run_id, "", scratch)
            if any(Path(local).iterdir()):
                client.log_artifacts(copy, local)
    except BaseException as exc:
        record_failure(client, copy, exc)
        _end_run(client, copy, RunStatus.to_string(RunStatus.FAILED))
        raise
    _end_run(client, copy, RunStatus.to_string(RunStatus.FINISHED))
    return copy
