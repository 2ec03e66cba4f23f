"""Per-neuron figures of the two-fold analysis, for a neuron card and for MLflow's Compare view.

They redraw one neuron's tables token by token, so the reader sees what the statistics summarise:
activations by category (top-down), segment homogeneity against its null (bottom-up), and where
the tokens lie in the embedding. Like `figures`, every figure carries the numbers it plots as
`fig.intraneuron_data` ({series name: array}), so tests check data rather than pixels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from intraneuron.analyses.two_fold.neuron import NeuronResult

UNCOVERED_COLOUR = "tab:gray"
SINGLE_COLOUR = "tab:blue"
# Marker areas (points^2) of the lowest and highest activation in the projection.
SIZE_MIN, SIZE_MAX = 8.0, 120.0
JITTER_SEED = 0  # fixed, so that a figure redrawn from the same result is the same picture


def neuron_figures(
    acts: np.ndarray,
    X: np.ndarray,
    result: NeuronResult,
    layer: int,
    neuron: int,
    category_names: dict[int, str] | None = None,
    *,
    alpha: float = 0.05,
) -> dict[str, Figure]:
    """Figures of one neuron by name: activation_by_category, homogeneity_by_segment, projection.

    acts: [n] core-token activations and X: [n, d] their vectors, in the order `result` was
    computed from (`TwoFoldNeuron.analyse`); category_names: {label: readable name}, default
    "category <label>"; alpha: the level that marks a segment significant (the analysis's
    `analysis.alpha`). A skipped neuron gets {}; one whose top-down analysis was skipped gets no
    activation_by_category and a single-colour projection.
    """
    if result.row.get("skipped", ""):
        return {}
    import matplotlib

    matplotlib.use("Agg")
    acts = np.asarray(acts, dtype=np.float64)
    X = np.asarray(X, dtype=np.float64)
    if acts.ndim != 1 or X.ndim != 2 or X.shape[0] != acts.size:
        raise ValueError(f"acts [n] and X [n, d] must agree, got {acts.shape} and {X.shape}")
    for name in ("token_labels", "segment_labels"):
        given = getattr(result, name)
        if given is not None and np.shape(given) != acts.shape:
            raise ValueError(f"result.{name} has shape {np.shape(given)}, acts {acts.shape}")
    names = _Names(category_names)
    labels = result.token_labels
    by_category = bool(
        labels is not None and not result.row.get("topdown_skipped", "") and len(result.categories)
    )
    figures = {}
    if by_category:
        figures["activation_by_category"] = activation_by_category(
            acts, np.asarray(labels), result.categories, result.row, layer, neuron, names
        )
    if len(result.segments):
        figures["homogeneity_by_segment"] = homogeneity_by_segment(
            result.segments, result.row, layer, neuron, alpha
        )
    figures["projection"] = projection(
        acts, X, labels if by_category else None, result.categories, layer, neuron, names
    )
    return figures


class _Names:
    """Readable names and fixed colours of category labels, shared by the figures of one neuron."""

    def __init__(self, names: dict[int, str] | None):
        self.names = {int(k): str(v) for k, v in (names or {}).items()}

    def __call__(self, label: int) -> str:
        return "uncovered" if label < 0 else self.names.get(int(label), f"category {label}")

    @staticmethod
    def colours(categories: np.ndarray) -> dict[int, object]:
        """label -> colour, by the label's position among the sorted categories (so the same
        category has the same colour in every figure of the neuron)."""
        from matplotlib import colormaps

        ordered = np.unique(np.asarray(categories)[np.asarray(categories) >= 0])
        cmap = colormaps[
            "tab10" if ordered.size <= 10 else "tab20" if ordered.size <= 20 else "turbo"
        ]
        if ordered.size <= 20:
            return {int(c): cmap(i) for i, c in enumerate(ordered)}
        return {int(c): cmap(i / (ordered.size - 1)) for i, c in enumerate(ordered)}


def activation_by_category(
    acts: np.ndarray,
    labels: np.ndarray,
    categories: pd.DataFrame,
    row: dict,
    layer: int,
    neuron: int,
    names: _Names,
) -> Figure:
    """Each category's activations as jittered points with its mean and interquartile range (from
    the categories table), categories from lowest to highest mean, uncovered tokens first and grey.

    Data: category (labels, plot order), mean / q25 / q75 / size (the table's rows in that order),
    activations.<label> per category and activations.uncovered when any token is uncovered."""
    from matplotlib import pyplot as plt

    table = categories.sort_values(["mean", "category"], kind="stable")
    order = table["category"].to_numpy().astype(np.int64)
    data: dict[str, np.ndarray] = {
        "category": order,
        "mean": table["mean"].to_numpy(dtype=np.float64),
        "q25": table["q25"].to_numpy(dtype=np.float64),
        "q75": table["q75"].to_numpy(dtype=np.float64),
        "size": table["size"].to_numpy(dtype=np.int64),
    }
    groups = [(int(c), acts[labels == c]) for c in order]
    uncovered = acts[labels < 0]
    if uncovered.size:
        data["activations.uncovered"] = uncovered
        groups.insert(0, (-1, uncovered))
    for c, values in groups:
        if c >= 0:
            data[f"activations.{c}"] = values
    colours = names.colours(order)
    rng = np.random.default_rng(JITTER_SEED)
    width = float(np.clip(1.0 + 0.8 * len(groups), 5.0, 14.0))  # 26 WordNet noun supersenses fit
    fig, ax = plt.subplots(figsize=(width, 4.8), layout="constrained")
    for x, (c, values) in enumerate(groups):
        colour = colours.get(c, UNCOVERED_COLOUR)
        ax.scatter(x + rng.uniform(-0.25, 0.25, values.size), values, s=10, color=colour,
                   alpha=0.5, linewidths=0)  # fmt: skip
        if c < 0:  # not a category of the analysis: its spread is shown, not summarised
            q25, q75, mean = *np.quantile(values, [0.25, 0.75]), values.mean()
        else:
            at = int(np.flatnonzero(order == c)[0])
            q25, q75, mean = data["q25"][at], data["q75"][at], data["mean"][at]
        ax.vlines(x + 0.35, q25, q75, color=colour, linewidth=4)
        ax.plot([x - 0.3, x + 0.3], [mean, mean], color="black", linewidth=1.5)
    ax.set_xticks(
        range(len(groups)),
        [f"{names(c)}\n(n = {values.size})" for c, values in groups],
        rotation=30 if len(groups) > 5 else 0,
        ha="right" if len(groups) > 5 else "center",
        fontsize="small",
    )
    ax.plot([], [], color="black", label="mean")
    ax.plot([], [], color="tab:gray", linewidth=4, label="interquartile range")
    ax.legend(fontsize="small", loc="best")
    ax.set(xlabel="category (ordered by mean activation, lowest first)", ylabel="activation")
    fig.suptitle(
        f"layer {layer}, neuron {neuron}: activation by category\n"
        f"Kruskal-Wallis p = {_fmt(row.get('kruskal_p'))}, ε² = {_fmt(row.get('epsilon2'))}"
    )
    return _finish(fig, data)


def homogeneity_by_segment(
    segments: pd.DataFrame, row: dict, layer: int, neuron: int, alpha: float
) -> Figure:
    """Observed within-segment homogeneity per segment against its permutation null (mean, ± 1 and
    2 SD bands), segments from lowest to highest activation; p < alpha marked.

    Data: the segments table's columns in plot order (segment, size, act_mean, homogeneity,
    null_mean, null_sd, z, p), null_{minus,plus}_{1,2}sd, significant, alpha and h_all."""
    from matplotlib import pyplot as plt

    table = segments.sort_values("segment", ascending=False, kind="stable")  # 0 = highest
    data = {
        column: table[column].to_numpy()
        for column in (
            "segment",
            "size",
            "act_mean",
            "homogeneity",
            "null_mean",
            "null_sd",
            "z",
            "p",
        )
    }
    for k in (1, 2):
        data[f"null_minus_{k}sd"] = data["null_mean"] - k * data["null_sd"]
        data[f"null_plus_{k}sd"] = data["null_mean"] + k * data["null_sd"]
    data["significant"] = np.asarray(data["p"] < alpha)
    data["alpha"] = np.array([alpha])
    data["h_all"] = np.array([float(row.get("h_all", np.nan))])

    x = np.arange(len(table))
    fig, ax = plt.subplots(figsize=(8.5, 4.5), layout="constrained")
    for k, shade in ((2, 0.15), (1, 0.3)):
        ax.fill_between(x, data[f"null_minus_{k}sd"], data[f"null_plus_{k}sd"], color="tab:gray",
                        alpha=shade, linewidth=0, label=f"null ± {k} SD")  # fmt: skip
    ax.plot(x, data["null_mean"], color="tab:gray", linestyle="--", label="permutation null, mean")
    ax.axhline(data["h_all"][0], color="tab:gray", linestyle=":", linewidth=1,
               label="all core tokens")  # fmt: skip
    ax.plot(x, data["homogeneity"], color="tab:blue", marker="o", label="observed")
    hit = data["significant"]
    ax.scatter(x[hit], data["homogeneity"][hit], s=140, marker="*", color="tab:red", zorder=3,
               label=f"p < {alpha:g}")  # fmt: skip
    ax.set_xticks(x, [f"{s}\n{_fmt(a, 2)}" for s, a in zip(data["segment"], data["act_mean"], strict=True)],
                  fontsize="small")  # fmt: skip
    ax.set(
        xlabel="activation segment, lowest → highest activation\n(segment id, 0 = highest; mean activation)",
        ylabel="within-segment homogeneity (cosine)",
    )
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(
        f"layer {layer}, neuron {neuron}: segment homogeneity vs permutation null\n"
        f"top segment z = {_fmt(row.get('z_top'))}, p = {_fmt(row.get('p_top'))}"
    )
    return _finish(fig, data)


def projection(
    acts: np.ndarray,
    X: np.ndarray,
    labels: np.ndarray | None,
    categories: pd.DataFrame,
    layer: int,
    neuron: int,
    names: _Names,
) -> Figure:
    """First two principal components of the L2-normalised vectors (cosine geometry, as the
    analysis sees it), coloured by category (labels None: one colour), marker area rising linearly
    with activation.

    Data: coordinates [n, 2], explained_variance_ratio [2], labels [n] (-1 where not coloured by
    category), sizes [n], activations [n]."""
    from matplotlib import pyplot as plt
    from matplotlib.lines import Line2D

    coordinates, explained = pca_2d(X)
    sizes = _areas(acts, acts)
    shown = (
        np.full(acts.size, -1, dtype=np.int64) if labels is None else np.asarray(labels, np.int64)
    )
    data = {
        "coordinates": coordinates,
        "explained_variance_ratio": explained,
        "labels": shown,
        "sizes": sizes,
        "activations": acts,
    }
    colours = names.colours(shown)
    handles = []
    if labels is None:
        point_colours = [SINGLE_COLOUR] * acts.size
    else:
        point_colours = [colours.get(int(c), UNCOVERED_COLOUR) for c in shown]
        by_mean = categories.sort_values(
            ["mean", "category"], ascending=[False, True], kind="stable"
        )
        legend_order = [int(c) for c in by_mean["category"]] + ([-1] if (shown < 0).any() else [])
        handles = [Line2D([], [], marker="o", linestyle="", color=colours.get(c, UNCOVERED_COLOUR),
                          label=names(c)) for c in legend_order]  # fmt: skip
    levels = np.quantile(acts, [0.0, 0.5, 1.0])
    handles += [Line2D([], [], marker="o", linestyle="", color="lightgray", label=f"activation {_fmt(a, 3)}",
                       markersize=float(np.sqrt(area))) for a, area in zip(levels, _areas(levels, acts), strict=True)]  # fmt: skip
    ncols = 1 + len(handles) // 18  # a lexical source can have dozens of categories
    draw = np.argsort(acts, kind="stable")  # highest activations drawn last, on top
    fig, ax = plt.subplots(figsize=(7 + 2.2 * (ncols - 1), 5.5), layout="constrained")
    ax.scatter(coordinates[draw, 0], coordinates[draw, 1], s=sizes[draw],
               c=[point_colours[i] for i in draw], alpha=0.7, edgecolors="white", linewidths=0.4)  # fmt: skip
    ax.set(
        xlabel=f"PC 1 ({explained[0]:.1%} of variance)",
        ylabel=f"PC 2 ({explained[1]:.1%} of variance)",
    )
    ax.legend(handles=handles, fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5), ncols=ncols,
              title="category (highest mean first)" if labels is not None else None)  # fmt: skip
    how = "coloured by category" if labels is not None else "no top-down categories (one colour)"
    fig.suptitle(f"layer {layer}, neuron {neuron}: core-token vectors, PCA of unit vectors\n"
                 f"{how}, marker area rising with activation")  # fmt: skip
    return _finish(fig, data)


def pca_2d(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates [n, 2] of the L2-normalised rows of X (zero rows stay at the origin's image)
    on their first two principal components, and the explained variance ratios [2]. With fewer
    than two components available (d = 1, or all points equal) the missing ones are 0."""
    from sklearn.decomposition import PCA

    norms = np.linalg.norm(X, axis=1, keepdims=True)
    unit = X / np.where(norms > 0, norms, 1.0)
    n_components = min(2, *unit.shape)
    coordinates = np.zeros((unit.shape[0], 2))
    explained = np.zeros(2)
    if n_components and np.ptp(unit, axis=0).any():
        pca = PCA(n_components=n_components, svd_solver="full").fit(unit)
        coordinates[:, :n_components] = pca.transform(unit)
        explained[:n_components] = np.nan_to_num(pca.explained_variance_ratio_)
    return coordinates, explained


def _areas(values: np.ndarray, acts: np.ndarray) -> np.ndarray:
    """Marker areas (points^2) of activation values, linear from the lowest to the highest of acts
    (all equal: the middle size)."""
    span = np.ptp(acts)
    scaled = (values - acts.min()) / span if span > 0 else np.full(np.shape(values), 0.5)
    return SIZE_MIN + (SIZE_MAX - SIZE_MIN) * scaled


def _fmt(value: object, digits: int = 3) -> str:
    try:
        value = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "n/a"
    return f"{value:.{digits}g}" if np.isfinite(value) else "n/a"


def _finish(fig: Figure, data: dict[str, np.ndarray]) -> Figure:
    from matplotlib import pyplot as plt

    fig.intraneuron_data = data
    plt.close(fig)  # the caller saves it; an open pyplot figure per neuron would accumulate
    return fig
