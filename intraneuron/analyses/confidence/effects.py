"""Mean ablation of neurons: total effect, direct effect (final-norm scale frozen) and the
frequency-frozen effect on the next-token distribution (Stolfo et al. 2024, spec 3.3 and 3.4).

    final_layer_effects(clean, w_out, unembed, mean_acts, ...) -> NeuronEffects   analytic, batched
    rerun_effects(handle, ids, layer, neurons, mean_acts, ...) -> NeuronEffects   one rerun per neuron
    freeze_direction(z_ablated, z_clean, u)                    -> logits with z_clean's projection on u
    mean_activation(handle, ids, layer, neurons)               -> [m] ablation values (from forward)

Analytic path (final layer only: after its neurons come only the final norm and W_U): the ablated
logits are (A + delta * B_i) / s + const, A the clean residual's and B_i the neuron's output row's
normed product with W_U, so the norm is never re-applied and W_U never multiplied again. TE
recomputes the norm's scale s on the ablated residual, DE keeps the clean s, DE_freq shifts the TE
logits along the unit frequency direction u back to the clean projection. The derivation:
docs/derivations.md ("Mean ablation at the last layer, analytically").

Memory: one step holds chunk x token_block x vocab float32 logits and their softmax, so
    peak ~ 8 * chunk * token_block * vocab bytes  (+ 8 * token_block * vocab for A and one
                                                   neuron's p * z, + 4 * chunk * vocab for B)
e.g. GPT-2 (vocab 50257) with chunk=4, token_block=128: ~206 MB (+ 52 MB). `per_token=True` adds
[m, N] tensors (N = filtered tokens) per quantity.

Per-token quantities (key: shape [m, N], the filtered positions in row-major (batch, position)
order): dloss_te, dloss_de, dentropy_te, dentropy_de, argmax_changed (TE argmax differs from the
clean one) and, with u, dloss_freq, dentropy_freq, and, with log P_freq, dkl_te, dkl_freq
(change of KL(P_freq || P_model)). Summaries [m]: mean_<key> and mean_abs_<key> for each, plus
    ln_mediated   = 1 - mean|dloss_de| / mean|dloss_te|
    freq_mediated = 1 - mean|dloss_freq| / mean|dloss_te|
    argmax_change_rate.
Per window (the windows bootstrap.py resamples): `window_sums` [m, W] of every summed quantity and
`window_tokens` [W], the filtered tokens of each window, so any summary can be recomputed on a
resample of windows without rerunning the model (`summarise`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from intraneuron.analyses.confidence.forward import (
    CleanPass,
    ablated_logits,
    clean_pass,
    mean_activation,
)
from intraneuron.models.weights import Unembedding

__all__ = ["NeuronEffects", "final_layer_effects", "freeze_direction", "mean_activation",
           "peak_bytes", "rerun_effects", "summarise"]  # fmt: skip  (mean_activation lives with the passes)


@dataclass(frozen=True)
class NeuronEffects:
    """Mean-ablation effects of `neurons` of `layer`, averaged over `n_tokens` filtered tokens."""

    layer: int
    neurons: torch.Tensor  # [m] long
    n_tokens: int
    summary: dict[str, torch.Tensor]  # name -> [m]
    per_token: dict[str, torch.Tensor] | None  # name -> [m, N]; None unless asked for
    window_sums: dict[str, torch.Tensor]  # summed quantity (dloss_te, abs_dloss_te, ...) -> [m, W] float64
    window_tokens: torch.Tensor  # [W] filtered tokens per window (long)

    def table(self):
        """One row per neuron: `neuron` and every summary column (a pandas DataFrame)."""
        import pandas as pd

        columns = {"neuron": self.neurons.numpy()} | {k: v.numpy() for k, v in self.summary.items()}
        return pd.DataFrame(columns).assign(layer=self.layer)


def peak_bytes(chunk: int, token_block: int, vocab: int) -> int:
    """The module docstring's memory formula for one step of `final_layer_effects`."""
    return 4 * vocab * (2 * chunk * token_block + 2 * token_block + chunk)


def freeze_direction(z_ablated: torch.Tensor, z_clean: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """z'' = z' + (<z, u> - <z', u>) u with u normalised: z' [..., V] keeps everything but its
    projection on u, which becomes z's [..., V] (the paper's `adjust_vectors_3dim`)."""
    u = _unit(u).to(z_ablated.dtype)
    shift = z_clean @ u - z_ablated @ u  # [...]
    return z_ablated + shift[..., None] * u


def final_layer_effects(clean: CleanPass, w_out: torch.Tensor, unembed: Unembedding,
                        mean_acts: torch.Tensor, *, mask: torch.Tensor | None = None,
                        freq_direction: torch.Tensor | None = None,
                        log_p_freq: torch.Tensor | None = None, chunk: int = 4,
                        token_block: int = 128, per_token: bool = False) -> NeuronEffects:  # fmt: skip
    """Analytic mean ablation of the final-layer neurons `clean.neurons`.

    w_out [m, d_model]: each neuron's output row as the model adds it to the residual (raw:
    `neuron_weights(handle, layer, processed=False).w_out[clean.neurons]`). `unembed`: raw or
    processed (`unembedding(handle, processed)`; the processed one gives the same softmax). Its
    vocabulary is the comparison's: u [V] and log_p_freq [V] must match it. mean_acts [m]: the
    ablation values. mask [B, T-1]: the counted positions (`token_filter`); default all.
    """
    if not clean.final_layer:
        raise ValueError(f"layer {clean.layer} is not the final layer: use rerun_effects")
    m = clean.neurons.numel()
    if w_out.shape[0] != m or mean_acts.shape != (m,):
        raise ValueError(f"w_out {tuple(w_out.shape)} / mean_acts {tuple(mean_acts.shape)}: expected {m} rows")
    r, acts, labels = _filtered(clean, mask)  # [N, d], [N, m], [N]
    norm, W_U = unembed.norm, unembed.W_U  # W_U [d, V]
    const = norm.bias @ W_U + unembed.b_U  # [V]
    w_c = _centre(w_out.float(), norm.kind)  # [m, d]
    u = None if freq_direction is None else _unit(freq_direction)
    totals = _Totals(m, _mask(clean, mask), per_token)
    for t0 in range(0, labels.numel(), token_block):
        rows = slice(t0, t0 + token_block)
        r_c = _centre(r[rows], norm.kind)  # [n, d]
        s0 = torch.sqrt(r_c.pow(2).mean(-1) + norm.eps)  # [n]
        A = (r_c * norm.gain) @ W_U  # [n, V]
        z0 = A / s0[:, None] + const  # [n, V] clean logits, by the same formula as the ablated ones
        before = _stats(z0[None], labels[rows], log_p_freq)
        proj0 = None if u is None else z0 @ u  # [n]
        for n0 in range(0, m, chunk):
            cols = slice(n0, n0 + chunk)
            delta = (mean_acts[cols, None] - acts[rows, cols].T).float()  # [c, n]
            B = (w_c[cols] * norm.gain) @ W_U  # [c, V]
            s1 = torch.sqrt((r_c + delta[..., None] * w_c[cols, None]).pow(2).mean(-1) + norm.eps)
            z = torch.mul(delta[..., None], B[:, None])  # [c, n, V], the one big buffer
            z.add_(A).div_(s1[..., None]).add_(const)  # TE: scale recomputed on r'
            te = _stats(z, labels[rows], log_p_freq)
            totals.add("te", cols, rows, te, before)
            if u is not None:
                z.addcmul_((proj0 - z @ u)[..., None], u)  # freeze_direction, in place
                totals.add("freq", cols, rows, _stats(z, labels[rows], log_p_freq), before)
            torch.mul(delta[..., None], B[:, None], out=z)
            z.add_(A).div_(s0[:, None]).add_(const)  # DE: the clean scale
            totals.add("de", cols, rows, _stats(z, labels[rows], log_p_freq), before)
            totals.add_argmax(cols, rows, te["argmax"] != before["argmax"])
    return totals.result(clean.layer, clean.neurons)


def rerun_effects(handle, ids: torch.Tensor, layer: int, neurons: Sequence[int] | torch.Tensor,
                  mean_acts: torch.Tensor, *, mask: torch.Tensor | None = None,
                  direct: bool = True, freq_direction: torch.Tensor | None = None,
                  log_p_freq: torch.Tensor | None = None, clean: CleanPass | None = None,
                  batch_size: int = 8, per_token: bool = False) -> NeuronEffects:  # fmt: skip
    """Mean ablation by rerunning the model once per neuron (one more with `direct`): the slow
    reference of `final_layer_effects` and the general path for any layer.

    TE: the neuron set to its mean through write hooks, everything downstream recomputed.
    DE (`direct`): the same rerun with the final norm dividing by the clean scale. For a non-final
    layer this is "final-norm scale frozen", not the paper's direct effect (the later layers still
    react to the ablation); for the final layer the two coincide. DE_freq: the TE logits with
    their projection on u frozen. Vocabulary: the model's full head (padding rows included).
    """
    neurons = torch.as_tensor(neurons, dtype=torch.long).reshape(-1)
    if clean is None:
        clean = clean_pass(handle, ids, layer, neurons, batch_size=batch_size)
    m, B, T = neurons.numel(), *ids.shape
    keep_2d = _mask(clean, mask)  # [B, T-1]
    keep = keep_2d.reshape(-1)
    labels = ids[:, 1:].reshape(-1)[keep]  # [N]
    z0 = clean.logits[:, :-1].reshape(B * (T - 1), -1)[keep]  # [N, V]
    before = _stats(z0[None], labels, log_p_freq)
    u = None if freq_direction is None else _unit(freq_direction)
    totals, rows = _Totals(m, keep_2d, per_token), slice(None)
    for j in range(m):
        cols = slice(j, j + 1)
        value = float(mean_acts[j])
        z = ablated_logits(handle, ids, layer, int(neurons[j]), value, batch_size=batch_size)
        z = z[:, :-1].reshape(B * (T - 1), -1)[keep][None]  # [1, N, V]
        te = _stats(z, labels, log_p_freq)
        totals.add("te", cols, rows, te, before)
        totals.add_argmax(cols, rows, te["argmax"] != before["argmax"])
        if u is not None:
            totals.add("freq", cols, rows, _stats(freeze_direction(z, z0, u), labels, log_p_freq), before)
        if direct:
            z = ablated_logits(handle, ids, layer, int(neurons[j]), value,
                               frozen_scale=clean.scale, batch_size=batch_size)  # fmt: skip
            z = z[:, :-1].reshape(B * (T - 1), -1)[keep][None]
            totals.add("de", cols, rows, _stats(z, labels, log_p_freq), before)
    return totals.result(layer, neurons)


def _unit(u: torch.Tensor) -> torch.Tensor:
    u = u.float()
    return u / u.norm()


def _centre(x: torch.Tensor, kind: str) -> torch.Tensor:
    return x - x.mean(-1, keepdim=True) if kind == "layernorm" else x


def _mask(clean: CleanPass, mask: torch.Tensor | None) -> torch.Tensor:
    B, T = clean.ids.shape
    if mask is None:
        return torch.ones(B, T - 1, dtype=torch.bool)
    if mask.shape != (B, T - 1):
        raise ValueError(f"mask of shape {tuple(mask.shape)}: expected {(B, T - 1)} (see token_filter)")
    return mask.bool().cpu()


def _filtered(clean: CleanPass, mask: torch.Tensor | None):
    """The counted positions t < T-1 as flat rows: resid [N, d], acts [N, m], labels [N]."""
    keep = _mask(clean, mask).reshape(-1)
    resid = clean.resid[:, :-1].reshape(keep.numel(), -1)[keep]
    acts = clean.acts[:, :-1].reshape(keep.numel(), -1)[keep]
    return resid, acts, clean.ids[:, 1:].reshape(-1)[keep]


def _stats(z: torch.Tensor, labels: torch.Tensor, log_p_freq: torch.Tensor | None) -> dict:
    """z [c, n, V], labels [n] -> loss, entropy, argmax (and KL(P_freq || P_model)) [c, n].

    Allocates one more [c, n, V] tensor (the softmax) and an [n, V] product: log p is never
    stored, as log p = z - lse, lse = max(z) - log(max(p)) (exact: the top token has p >= 1/V),
    H = lse - sum(p z), KL = sum(P_f log P_f) - P_f @ z + lse. sum(p z) is torch's cascaded sum
    of one neuron's product at a time: a batched dot product (einsum -> bmm) over a 50k
    vocabulary accumulates ~1e-3 of float32 error, as large as a small neuron's entropy effect.
    """
    top, argmax = z.max(-1)  # [c, n]
    p = torch.softmax(z, -1)
    lse = top - torch.log(p.gather(-1, argmax[..., None]).squeeze(-1))
    out = {"argmax": argmax,
           "loss": lse - z.gather(-1, labels.expand(z.shape[0], -1)[..., None]).squeeze(-1),
           "entropy": lse - torch.stack([(p_i * z_i).sum(-1) for p_i, z_i in zip(p, z, strict=True)])}  # fmt: skip
    del p
    if log_p_freq is not None:
        p_f = log_p_freq.float().exp()  # [V]
        out["kl"] = torch.special.xlogy(p_f, p_f).sum() - z @ p_f + lse
    return out


class _Totals:
    """Running per-neuron sums, per window and in all (and, optionally, per-token rows) of the effects."""

    def __init__(self, m: int, counted: torch.Tensor, per_token: bool):
        """counted [W, T-1]: the positions that count (`_mask`)."""
        self.n_windows, positions = counted.shape
        self.windows = torch.arange(self.n_windows).repeat_interleave(positions)[counted.reshape(-1)]  # [N]
        self.m, self.n_tokens, self.keep = m, self.windows.numel(), per_token
        self.sums: dict[str, torch.Tensor] = {}  # key -> [m, W]
        self.rows: dict[str, torch.Tensor] = {}

    def _put(self, key: str, cols: slice, rows: slice, value: torch.Tensor, signed: bool = True):
        value = value.double()  # [c, n]
        window = self.windows[rows]  # [n]
        for name, part in ((key, value), *([(f"abs_{key}", value.abs())] if signed else [])):
            if name not in self.sums:
                self.sums[name] = torch.zeros(self.m, self.n_windows, dtype=torch.float64)
            self.sums[name][cols].index_add_(1, window, part)
        if self.keep:
            if key not in self.rows:
                self.rows[key] = torch.zeros(self.m, self.n_tokens)
            self.rows[key][cols, rows] = value.float()

    def add(self, variant: str, cols: slice, rows: slice, after: dict, before: dict) -> None:
        """variant "te" / "de" / "freq": the change of each statistic from `before` [1, n]."""
        self._put(f"dloss_{variant}", cols, rows, after["loss"] - before["loss"])
        self._put(f"dentropy_{variant}", cols, rows, after["entropy"] - before["entropy"])
        if "kl" in after and variant != "de":
            self._put(f"dkl_{variant}", cols, rows, after["kl"] - before["kl"])

    def add_argmax(self, cols: slice, rows: slice, changed: torch.Tensor) -> None:
        self._put("argmax_changed", cols, rows, changed, signed=False)

    def result(self, layer: int, neurons: torch.Tensor) -> NeuronEffects:
        totals = {k: v.sum(-1) for k, v in self.sums.items()}  # [m]
        summary = {k: v.float() for k, v in summarise(totals, max(self.n_tokens, 1)).items()}
        per_token = self.rows if self.keep else None
        tokens = torch.bincount(self.windows, minlength=self.n_windows)
        return NeuronEffects(layer, neurons.clone(), self.n_tokens, summary, per_token, dict(self.sums), tokens)


def summarise(sums: dict, n_tokens) -> dict:
    """Summaries from sums over tokens: mean_<key> = sum / n_tokens, the mediated shares
    1 - mean|dloss_de| / mean|dloss_te| (and _freq), argmax_change_rate. sums: key -> [..., m]
    (torch or numpy), n_tokens a number or [..., 1], so resampled sums [R, m] work as one."""
    summary = {f"mean_{k}": v / n_tokens for k, v in sums.items()}
    te = summary.get("mean_abs_dloss_te")
    for name, key in (("ln_mediated", "de"), ("freq_mediated", "freq")):
        if te is not None and f"mean_abs_dloss_{key}" in summary:
            summary[name] = 1 - summary[f"mean_abs_dloss_{key}"] / te
    if "mean_argmax_changed" in summary:
        summary["argmax_change_rate"] = summary.pop("mean_argmax_changed")
    return summary
