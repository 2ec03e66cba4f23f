"""The memory plan of an extraction: estimate the peak before the pass, split the layers into passes.

A pass over several layers holds every layer's tables at once, so its peak grows with the number of
layers; a pass per layer re-runs the forward pass. The plan puts as many layers in a pass as fit the
budget (`extraction.memory_gb`, or the memory available when the extraction starts), in layer order
so each pass stops early at its own deepest layer, and refuses in one line, before any forward pass,
when a single layer does not fit. On a GPU the type tables stay on it when they fit its free memory,
else on the host (`table_device`). Estimates count the float64 sums, float32 maxima, the profile
exported at the end of the pass (on the host the float32 means are written over the sums they come
from and the per-type table derived from the per-half one takes the pages they give back,
extraction/table_export.py; elsewhere both are new), and the batch's captured activations; what the process already holds (the corpus, the libraries: its
resident memory) is counted once, and the weights the pass reads on top of it (transformers maps
them from disk: they become resident when read). The estimate is an upper bound (every layer's
export counted as if at once): measured peak RSS against it in benchmarks/extraction.py.

Shapes: D = d_mlp, n = pseudo-neurons, M = d_model, U = token types in the pass, F = (type, half)
keys, K = top-k, B = histogram bins + 2, N = tokens in a batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from intraneuron.errors import ConfigError
from intraneuron.extraction.stats import PSEUDO_STATS
from intraneuron.extraction.types import TypeKeys

GB = 2**30
AVAILABLE_SHARE = 0.8  # of the memory available at the start: the rest is left to the system and to
# the allocator's slack (freed tensors are not always returned at once)


@dataclass(frozen=True)
class LayerFootprint:
    """Bytes one layer needs during a pass."""

    tables: int  # the streaming statistics (type tables, top-k, histograms, moments)
    export: int  # what exporting the profile adds at the end of the pass (held until it is saved)

    @property
    def total(self) -> int:
        return self.tables + self.export


def layer_footprint(
    spec, settings, *, d_mlp: int, d_model: int, n_types: int, n_folds: int, on_host: bool = True
) -> LayerFootprint:
    """The estimate for one layer of `spec` (extraction/stats.py names) with these dimensions;
    `on_host`: the tables' means are exported over their sums (TokenTypeTable.export)."""
    mean_bytes = 0 if on_host else 4
    layer_spec = spec
    columns = [(d_mlp, layer_spec)]  # (columns, the stats they get): the neurons, the pseudo-neurons
    if "pseudo_neurons" in layer_spec:
        columns.append((settings.pseudo_neurons, PSEUDO_STATS.intersection(layer_spec)))
    max_bytes = 4 if settings.track_type_max else 0
    tables = export = 0
    for c, spec in columns:
        if "topk" in spec:
            tables += settings.top_k * c * 12  # float32 values + int64 positions
            export += settings.top_k * c * 20  # values, positions, token ids
        if "histogram" in spec:
            tables += c * (settings.hist_bins + 2) * 8
            export += c * (settings.hist_bins + 2) * 8
        if "moments" in spec:
            tables += c * 8 * 7
        if "fold_token_types" in spec:  # float64 sums, float32 maxima; exported: float32 means (the
            tables += n_folds * (c * (8 + max_bytes) + 16)  # maxima are the table's own tensor)
            export += n_folds * c * mean_bytes
        if "token_types" in spec:
            if "fold_token_types" in spec:  # derived from the fold table at export, block by block
                export += n_types * c * (mean_bytes + max_bytes)
            else:
                tables += n_types * (c * (8 + max_bytes) + 16)
                export += n_types * c * mean_bytes
    if "input_token_types" in layer_spec:
        tables += n_types * (d_model * 8 + 16)
        export += n_types * d_model * mean_bytes
    return LayerFootprint(tables, export)


def batch_bytes(spec, settings, *, d_mlp: int, d_model: int, tokens_per_batch: int) -> int:
    """Per layer: the captured sites and the per-batch working copies of the statistics."""
    n = tokens_per_batch
    sites = n * (d_mlp + 2 * d_model) * 4  # neurons, layer input, MLP input
    work = n * d_mlp * (4 * 3 + 8)  # float32 copies (top-k, buffers, histogram position) + int64 bins
    if "fold_token_types" in spec or "token_types" in spec:
        work += n * d_mlp * (4 + 8)  # the batch's per-key sums [U_b <= N, D], float32 then float64
    if "pseudo_neurons" in spec:
        work += n * settings.pseudo_neurons * 4 * 6  # pre-activations (gate, up), calibrated, activations
        # the MLP input on the calibration sample, held per layer until the sample is complete
        work += settings.pseudo_calibration_windows * (tokens_per_batch // settings.batch_size) * d_model * 4
    return sites + work


def held_bytes() -> int:
    """What this process holds before the pass (the model, the corpus, the libraries): its RSS."""
    return psutil.Process().memory_info().rss


def available_bytes() -> int:
    """What this process may still grow by, and what it holds already: the budget when
    `extraction.memory_gb` is not set."""
    return int(psutil.virtual_memory().available * AVAILABLE_SHARE) + held_bytes()


@dataclass(frozen=True)
class PassPlan:
    passes: list[list[int]]  # layers of each pass, in order
    per_layer: dict[int, int]  # bytes per layer (tables, export, batch)
    fixed: int  # what the process holds before the pass (model, corpus, libraries)
    budget: int

    def peak(self, layers: list[int]) -> int:
        return self.fixed + sum(self.per_layer[l] for l in layers)

    def describe(self) -> str:
        layer_gb = max(self.per_layer.values()) / GB
        passes = "; ".join(
            f"layers {p[0]}" + (f"-{p[-1]}" if len(p) > 1 else "") + f" ({self.peak(p) / GB:.1f} GB)"
            for p in self.passes
        )
        return (f"memory plan: {self.fixed / GB:.2f} GB held + up to {layer_gb:.2f} GB per layer, budget "
                f"{self.budget / GB:.1f} GB -> {len(self.passes)} pass{'es' if len(self.passes) > 1 else ''}: {passes}")  # fmt: skip


def plan_passes(layers: list[int], per_layer: dict[int, int], fixed: int, memory_gb: float | None) -> PassPlan:
    """Greedy in layer order: a layer joins the current pass while the pass's peak fits the budget.
    Raises ConfigError (extraction.memory_gb) when one layer alone does not fit."""
    budget = int(memory_gb * GB) if memory_gb is not None else available_bytes()
    passes: list[list[int]] = []
    for layer in sorted(layers):
        need = fixed + per_layer[layer]
        if need > budget:
            allowed = (f"at least {need / GB:.1f} GB: layer {layer} alone needs {per_layer[layer] / GB:.2f} GB "
                       f"beside the {fixed / GB:.2f} GB this process holds (model, corpus, libraries)")  # fmt: skip
            if memory_gb is None:
                allowed += f" and this machine has {budget / GB:.1f} GB available; fewer pseudo-neurons or a smaller corpus"
            raise ConfigError("extraction.memory_gb", memory_gb, allowed)
        if passes and fixed + sum(per_layer[l] for l in passes[-1]) + per_layer[layer] <= budget:
            passes[-1].append(layer)
        else:
            passes.append([layer])
    return PassPlan(passes, per_layer, fixed, budget)


def table_device(device: torch.device, table_bytes: int) -> torch.device:
    """Where a pass keeps its type tables: on the model's accelerator when they fit in its free
    memory (batches are reduced there and never leave it), else on the host, which then receives
    each batch's small per-type buffers [U_b, D] rather than the activations."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if table_bytes <= free * AVAILABLE_SHARE else torch.device("cpu")


def plan_extraction(
    handle, windows, layers: list[int], settings, spec, window_range: range | None = None
) -> tuple[PassPlan, TypeKeys]:
    """The memory plan of extracting `layers` over `window_range` (default: every window), and the
    type keys that size its tables; raises ConfigError before any pass when one layer cannot fit."""
    window_range = range(int(windows.ids.shape[0])) if window_range is None else window_range
    keys = TypeKeys.of_windows(windows.ids, window_range, settings.skip_first_positions,
                               settings.fold_block_windows)
    dims = {"d_mlp": handle.d_mlp, "d_model": handle.d_model}
    on_host = torch.device(settings.device).type == "cpu"  # a GPU's tables may spill to the host: counted as new
    per_layer = layer_footprint(spec, settings, n_types=len(keys.types), n_folds=len(keys.folds), on_host=on_host,
                                **dims).total  # fmt: skip
    per_layer += batch_bytes(spec, settings, tokens_per_batch=settings.batch_size * windows.window_len, **dims)
    # weights load memory-mapped and become resident as the pass reads them: count those it reads
    held = held_bytes() + weight_bytes_up_to(handle, max(layers))
    plan = plan_passes(layers, dict.fromkeys(layers, per_layer), held, settings.memory_gb)
    return plan, keys


def weight_bytes_up_to(handle, layer: int) -> int:
    """Bytes of the weights a pass that stops after `layer` reads: every block up to it and what is
    outside the blocks (embeddings, norms)."""
    later = tuple(f"{handle.adapter.layer_path(l)}." for l in range(layer + 1, handle.n_layers))
    return sum(p.numel() * p.element_size() for name, p in handle.model.named_parameters() if not name.startswith(later))
