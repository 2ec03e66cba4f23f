"""Merge the shard runs of a sweep into whole layers: `intraneuron merge` and the Hydra callback
`merge_shards` (conf/hydra/callbacks/mlflow_sweep.yaml, on with `sweep=layer_shards`).

A layer too wide for one job is analysed by several jobs over disjoint neuron ranges (the unit of
work is model x layer x neuron range x config: `neurons=range neurons.start=.. neurons.stop=..`,
or `neurons.shards=n neurons.shard=0..n-1`), nested under one sweep parent run. Merging:

1. the parent's FINISHED child runs (earlier merged runs left out) are grouped by their composed
   config (`config/composed.yaml`) without `layer` and the neuron range keys (RANGE_KEYS): one
   group = one config whose layers were sharded;
2. per group and layer, the shards' neuron sets (their `neurons` tables) must be disjoint and,
   together, cover the range they were cut from (a gap is refused unless allow_gaps);
3. the analysis's `merge_layer` rebuilds the layer's LayerResult from the shards' tables, which
   is logged through `reports.artifacts.log_layer_result` like a job's: to the parent run when the
   sweep has one group, else to one new child run per group, named "merged: <what differs>".

Merged runs are tagged MERGED_TAG=true and MERGED_FROM_TAG=<the shard run ids>. Cards are not
rebuilt (they need the model): `intraneuron show <run> --neuron N` rebuilds one from the tables.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from intraneuron.analyses.base import ShardMergeError
from intraneuron.tracking.redact import redact

MERGED_TAG = "intraneuron.merged"
MERGED_FROM_TAG = "intraneuron.merged_from"
RANGE_KEYS = ("select", "start", "stop", "shard", "shards")  # of `neurons`: what differs between shards
PARENT_TAG = "mlflow.parentRunId"


class MergeGap(ShardMergeError):
    """The shards of a layer leave neurons out (a missing or failed shard job)."""


@dataclass
class ShardRun:
    """One FINISHED child run of the sweep and what it analysed."""

    run_id: str
    config: dict[str, Any]  # its composed config
    layers: list[int]
    neurons: Any  # analyses.neurons.NeuronsConfig


@dataclass
class MergedLayer:
    """One layer merged: where it was logged and its headline metrics."""

    run_id: str
    layer: int
    shard_run_ids: list[str]
    neurons: str  # the neurons covered, e.g. "0-31"
    headline: dict[str, float] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)  # why a NaN headline metric is (name -> reason)

    def line(self) -> str:
        from intraneuron.reports.artifacts import headline_text

        metrics = headline_text(self.headline, self.reasons)
        return (f"layer {self.layer}: merged {len(self.shard_run_ids)} shards (neurons {self.neurons}) "
                f"into run {self.run_id}: {metrics}")  # fmt: skip


def parent_run_id(target: str) -> str:
    """A parent run id from the command's target: a sweep folder (its `mlflow_parent_run_id`
    file) or the id itself."""
    from intraneuron.tracking.hydra_job import PARENT_RUN_ID_FILE

    folder = Path(target)
    if folder.is_dir():
        marker = folder / PARENT_RUN_ID_FILE
        if not marker.is_file():
            raise ShardMergeError(f"{target} is a folder without {PARENT_RUN_ID_FILE} (not a multirun's sweep folder)")
        return marker.read_text().strip()
    return target


def merge_sweep(client, parent_id: str, *, allow_gaps: bool = False,
                echo: Callable[[str], None] = print) -> list[MergedLayer]:  # fmt: skip
    """Merge every sharded layer of the sweep under `parent_id` (see the module docstring);
    echo gets one line per merged layer. ShardMergeError (MergeGap for a gap) when it cannot."""
    from intraneuron.reports.artifacts import quiet_downloads

    with quiet_downloads():
        merged = _merge_sweep(client, parent_id, allow_gaps, echo)
    clear_merge_error(client, parent_id)
    return merged


def clear_merge_error(client, parent_id: str) -> None:
    """After a merge that succeeded: the parent's MERGE_ERROR_TAG goes, and a parent that ended
    FAILED only for it (no job failed or was killed) ends FINISHED."""
    from mlflow.entities import RunStatus

    from intraneuron.tracking.sweep_callback import MERGE_ERROR_TAG

    parent = client.get_run(parent_id)
    if MERGE_ERROR_TAG not in parent.data.tags:
        return
    client.delete_tag(parent_id, MERGE_ERROR_TAG)
    jobs_ok = not parent.data.metrics.get("sweep.jobs_failed") and not parent.data.metrics.get("sweep.jobs_killed")
    if parent.info.status == RunStatus.to_string(RunStatus.FAILED) and jobs_ok:
        client.set_terminated(parent_id, status=RunStatus.to_string(RunStatus.FINISHED))


def _merge_sweep(client, parent_id: str, allow_gaps: bool, echo: Callable[[str], None]) -> list[MergedLayer]:
    shards = shard_runs(client, parent_id)
    if not shards:
        raise ShardMergeError(f"run {parent_id} has no FINISHED child runs to merge")
    groups = group_shards(shards)
    differs = differing_keys([g[0].config for g in groups.values()])
    merged = []
    for members in groups.values():
        if len(groups) == 1:
            layers = merge_group(client, parent_id, members, allow_gaps=allow_gaps)
        else:
            layers = merge_into_new_run(client, parent_id, members, differs, allow_gaps=allow_gaps)
        for layer_result in layers:
            merged.append(layer_result)
            echo(layer_result.line())
    return merged


def merge_into_new_run(client, parent_id: str, members: list[ShardRun], differs: list[str], *,
                       allow_gaps: bool) -> list[MergedLayer]:  # fmt: skip
    """One group of several: its merged layers in a new child run of the parent, ended FINISHED
    with the headline sentence as its description (FAILED with the reason if the merge fails)."""
    from mlflow.entities import RunStatus
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

    from intraneuron.tracking.run import record_failure

    run_id = new_merged_run(client, parent_id, members, differs)
    try:
        layers = merge_group(client, run_id, members, allow_gaps=allow_gaps)
    except BaseException as error:
        record_failure(client, run_id, error)
        client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.FAILED))
        raise
    note = "\n".join(line.line() for line in layers)
    client.set_tag(run_id, MLFLOW_RUN_NOTE, note)
    client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.FINISHED))
    return layers


def shard_runs(client, parent_id: str) -> list[ShardRun]:
    """The parent's FINISHED child runs that a job logged (not earlier merges), oldest first."""
    parent = client.get_run(parent_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and attributes.status = 'FINISHED'",
        max_results=10_000,
        order_by=["attributes.start_time ASC"],
    )
    return [shard_run(client, run) for run in runs if run.data.tags.get(MERGED_TAG) != "true"]


def shard_run(client, run) -> ShardRun:
    """A child run with its composed config, layers and neuron selection."""
    import yaml

    from intraneuron.analyses.neurons import NeuronsConfig
    from intraneuron.reports.artifacts import COMPOSED_CONFIG

    with tempfile.TemporaryDirectory(prefix="intraneuron-merge-") as tmp:
        try:
            local = client.download_artifacts(run.info.run_id, COMPOSED_CONFIG, tmp)
        except Exception as error:
            raise ShardMergeError(f"run {run.info.run_id} has no {COMPOSED_CONFIG} ({error})") from None
        config = yaml.safe_load(Path(local).read_text())
    layer = config.get("layer")
    layers = [int(x) for x in (layer if isinstance(layer, list) else [layer])]
    spec = NeuronsConfig(**config.get("neurons", {}))
    if spec.select == "sample":
        raise ShardMergeError(f"run {run.info.run_id} analysed a sample of neurons (neurons=sample): "
                              "only ranges (neurons=range or neurons.shards) merge into a layer")  # fmt: skip
    return ShardRun(run.info.run_id, config, layers, spec)


def group_key(config: dict[str, Any]) -> str:
    """The config without `layer` and the neuron range keys, as canonical JSON."""
    rest = {k: v for k, v in config.items() if k != "layer"}
    rest["neurons"] = {k: v for k, v in (config.get("neurons") or {}).items() if k not in RANGE_KEYS}
    return json.dumps(rest, sort_keys=True, default=str)


def group_shards(shards: list[ShardRun]) -> dict[str, list[ShardRun]]:
    """Shard runs by group_key, in order of first appearance."""
    groups: dict[str, list[ShardRun]] = {}
    for shard in shards:
        groups.setdefault(group_key(shard.config), []).append(shard)
    return groups


def differing_keys(configs: list[dict[str, Any]]) -> list[str]:
    """Flattened config keys (outside the neuron range and `layer`) whose values differ between
    the groups: what names a group's merged run."""
    from intraneuron.tracking.params import flatten

    flat = [flatten(json.loads(group_key(c))) for c in configs]
    keys = sorted(set().union(*flat))
    return [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat}) > 1]


def new_merged_run(client, parent_id: str, members: list[ShardRun], differs: list[str]) -> str:
    """A new child run of the parent for one group's merged layers, with the params of its first
    shard (less `neurons.*`) and its composed config (all the group's layers)."""
    import yaml
    from mlflow.entities import Param

    from intraneuron.reports.artifacts import COMPOSED_CONFIG
    from intraneuron.tracking.params import flatten, mlflow_params, mlflow_tags

    parent = client.get_run(parent_id)
    flat = flatten(members[0].config)
    name = "merged: " + " ".join(f"{k}={flat.get(k)}" for k in differs)
    tags = {PARENT_TAG: parent_id, MERGED_TAG: "true", MERGED_FROM_TAG: ",".join(m.run_id for m in members)}
    run_id = client.create_run(parent.info.experiment_id, run_name=name[:250], tags=mlflow_tags(tags)).info.run_id
    first = client.get_run(members[0].run_id).data.params
    params = mlflow_params({k: v for k, v in first.items() if not k.startswith("neurons.")})
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    config = dict(members[0].config, layer=sorted({layer for m in members for layer in m.layers}))
    client.log_text(run_id, yaml.safe_dump(config, sort_keys=False), COMPOSED_CONFIG)
    return run_id


def merge_group(client, target_id: str, members: list[ShardRun], *, allow_gaps: bool) -> list[MergedLayer]:
    """Merge each layer of one group's shards and log it to `target_id`; the run's tags and its
    figures across layers as a job's run has them."""
    from omegaconf import OmegaConf

    from intraneuron.config import validate
    from intraneuron.errors import ConfigError
    from intraneuron.reports import artifacts
    from intraneuron.tracking.logger import RunLogger

    try:
        run_config = validate(OmegaConf.create(members[0].config))
    except ConfigError as error:
        raise ShardMergeError(f"the config of run {members[0].run_id} does not validate here: {error}") from None
    analysis = run_config.analysis
    tracker = RunLogger(client, target_id)
    headline = dict(analysis.headline)
    layers = sorted({layer for m in members for layer in m.layers})
    merged, layer_metrics = [], {}
    for layer in layers:
        shards = [m for m in members if layer in m.layers]
        tables = [download_layer_tables(client, m.run_id, layer) for m in shards]
        covered = check_coverage(layer, shards, tables, allow_gaps=allow_gaps)
        result = analysis.merge_layer(run_config, layer, tables)
        values, reasons = artifacts.log_layer_result(tracker, layer, result, headline, analysis.companions,
                                                     artifacts.figure_heading(run_config, layer))  # fmt: skip
        layer_metrics[layer] = result.metrics
        merged.append(MergedLayer(target_id, layer, [m.run_id for m in shards], covered, values, reasons))
    for name, figure in analysis.run_figures(layer_metrics).items():
        artifacts.log_figure(tracker, figure, artifacts.run_figure_path(name), artifacts.figure_heading(run_config, layers))
    # tagged once every layer is in: a run tagged merged holds the whole merge
    tracker.set_tags({MERGED_TAG: "true", MERGED_FROM_TAG: ",".join(m.run_id for m in members),
                      **artifacts.headline_tags(analysis)})  # fmt: skip
    return merged


def download_layer_tables(client, run_id: str, layer: int) -> dict[str, Any]:
    """A run's tables of one layer (layer_<l>/tables/*.parquet) by name."""
    import pandas as pd

    from intraneuron.reports.artifacts import layer_prefix

    folder = f"{layer_prefix(layer)}tables"
    with tempfile.TemporaryDirectory(prefix="intraneuron-merge-") as tmp:
        try:
            local = Path(client.download_artifacts(run_id, folder, tmp))
        except Exception as error:
            raise ShardMergeError(f"run {run_id} logged no tables of layer {layer} ({error})") from None
        tables = {path.stem: pd.read_parquet(path) for path in sorted(local.glob("*.parquet"))}
    if "neurons" not in tables:
        raise ShardMergeError(f"run {run_id} logged no neurons table of layer {layer}")
    return tables


def check_coverage(layer: int, shards: list[ShardRun], tables: list[dict[str, Any]], *, allow_gaps: bool) -> str:
    """The neurons the shards cover, as text ("0-31"), after checking that they are disjoint
    (ShardMergeError naming the runs) and leave no gap (MergeGap, unless allow_gaps).

    A gap is a missing shard index of `neurons.shards` (which also finds a missing last shard), or
    a hole between the lowest `neurons.start` and the highest neuron any shard analysed. With plain
    ranges the layer's width is not known here, so a missing last range cannot be seen.
    """
    sets = [{int(n) for n in t["neurons"]["neuron"]} for t in tables]
    owner: dict[int, str] = {}
    for shard, neurons in zip(shards, sets, strict=True):
        clash = sorted(n for n in neurons if n in owner)
        if clash:
            raise ShardMergeError(f"layer {layer}: runs {owner[clash[0]]} and {shard.run_id} both analysed "
                                  f"neurons {spans(clash)}: a layer's shards must not overlap")  # fmt: skip
        owner.update(dict.fromkeys(neurons, shard.run_id))
    problems = missing_shards(shards)
    lowest = min(s.neurons.start if s.neurons.select == "range" else 0 for s in shards)
    holes = sorted(set(range(lowest, max(owner, default=lowest - 1) + 1)) - set(owner))
    if holes:
        problems.append(f"no shard analysed neurons {spans(holes)}")
    if problems and not allow_gaps:
        raise MergeGap(f"layer {layer}: " + "; ".join(problems) + " (a shard job failed or was not run; "
                       "rerun it, or merge anyway with --allow-gaps)")  # fmt: skip
    return spans(sorted(owner))


def missing_shards(shards: list[ShardRun]) -> list[str]:
    """With neurons.shards > 1: the shard indices no run has, as problems; the shards of one range
    must share select, start, stop and shards."""
    split = [s for s in shards if s.neurons.shards > 1]
    if not split:
        return []
    cuts = {(s.neurons.select, s.neurons.start, s.neurons.stop, s.neurons.shards) for s in split}
    if len(cuts) > 1 or len(split) < len(shards):
        raise ShardMergeError(f"the shards cut different ranges (neurons select, start, stop, shards: {sorted(cuts, key=str)}"
                              f"{', and runs without neurons.shards' if len(split) < len(shards) else ''})")  # fmt: skip
    n = split[0].neurons.shards
    missing = sorted(set(range(n)) - {s.neurons.shard for s in split})
    return [f"shards {', '.join(map(str, missing))} of neurons.shards={n} have no FINISHED run"] if missing else []


def spans(neurons: list[int]) -> str:
    """Sorted neuron indices as ranges: [0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8"."""
    parts: list[str] = []
    start = prev = None
    for n in neurons:
        if prev is not None and n == prev + 1:
            prev = n
            continue
        if start is not None:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
        start = prev = n
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ", ".join(parts) or "none"


class MergeShardsCallback(Callback):
    """With `enabled`, merge a completed multirun's layer shards before its parent run is closed.

    Hydra calls `on_multirun_end` of its callbacks in reverse order, and this one is listed after
    `mlflow_sweep`, so it runs first; Hydra skips it when a job failed (nothing whole to merge;
    `intraneuron merge --allow-gaps` merges what there is). A merge that fails is one line on
    stderr and the tag MERGE_ERROR_TAG on the parent run, which then ends FAILED; `intraneuron merge`
    run later (after a rerun of the missing shard, or with --allow-gaps) clears both.
    """

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: str | None = None,
                 enabled: bool = False):  # fmt: skip
        self.tracking = (tracking_uri, experiment, artifact_root)  # plain data: Hydra may pickle callbacks
        self.enabled = bool(enabled)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        if not self.enabled:
            return
        import sys

        from intraneuron.tracking.hydra_job import PARENT_RUN_ID_FILE
        from intraneuron.tracking.store import TrackingConfig, open_experiment
        from intraneuron.tracking.sweep_callback import MERGE_ERROR_TAG

        base_dir = Path.cwd()  # the launching directory, as for the sweep's parent run
        marker = (base_dir / str(config.hydra.sweep.dir)).resolve() / PARENT_RUN_ID_FILE
        if not marker.is_file():
            return
        parent_id, client = marker.read_text().strip(), None
        try:
            client, _ = open_experiment(TrackingConfig(*self.tracking), base_dir)
            merge_sweep(client, parent_id, echo=lambda line: print(f"merge_shards: {line}"))
        except Exception as error:
            message = redact(f"{type(error).__name__}: {_first_line(error)}")
            sys.stderr.write(f"MLflow sweep run {parent_id}: shards not merged ({message}); the run ends FAILED "
                             f"until `intraneuron merge {parent_id}` succeeds\n")  # fmt: skip
            if client is not None:
                with contextlib.suppress(Exception):
                    client.set_tag(parent_id, MERGE_ERROR_TAG, message)


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
