"""Pseudo-neurons: random read-in directions through a layer's own MLP nonlinearity (a geometry null).

A real neuron's token preferences could come from where its read-in vector points (outlier
dimensions, the mean direction of the residual stream) rather than from what it computes. Each
pseudo-neuron j copies a real neuron i_j of the layer but rotates its read-in by one random
orthogonal matrix Q per layer, keeps its bias and the layer's activation function, and is then run
through the very same streaming statistics; an effect seen in real neurons and not in these is not
geometry alone.

In the space the MLP reads (x = output of the pre-MLP norm, the input of its first projection):

    pre'_j   = x . (Q w_{i_j}) + b_{i_j}                           (gated: gate and up separately)
    pre''_j  = (pre'_j - m'_j) / s'_j * s_{i_j} + m_{i_j}          calibration, fixed on a sample
    act_j    = act(pre''_j)            (gated: act(gate''_j) * up''_j; site mlp.hook_pre: pre''_j)

m', s' (m, s) are the mean and population sd of the pseudo (source neuron's real) pre-activation
over the kept tokens of a calibration sample: `extraction.pseudo_calibration_windows` windows
evenly strided across the whole corpus (not its first batch, which is one book's opening), the same
for every corpus shard and every pass. A random direction can hit the residual stream's outlier
dimensions, and calibration keeps each pseudo-neuron in its source neuron's operating range. The
source neurons' real pre-activations are computed on the sample only, never during the pass.
Neurons are drawn without replacement, d_mlp at a time, each block of d_mlp pseudo-neurons with its
own Q (Haar, by QR of a Gaussian), from numpy's generator seeded with (pseudo_seed, layer): more
pseudo-neurons than neurons (2,048 against SmolLM2's 1,536) copy a neuron twice under two
rotations, never twice under one (that would be one pseudo-neuron counted twice).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

import numpy as np
import torch

from intraneuron.extraction.reducers import Stat, State

# the MLP's activation function module inside a block, by adapter
ACTIVATION_PATHS = {
    "gpt2": "mlp.act", "gpt_neox": "mlp.act", "llama": "mlp.act_fn", "bert": "intermediate.intermediate_act_fn",
}
_EXTRAS = ("source_neurons", "rotation_seed", "calib_pseudo_mean", "calib_pseudo_sd", "calib_real_mean",
           "calib_real_sd", "topk_token_ids")  # fmt: skip


@dataclass(frozen=True)
class PseudoReadIn:
    """The pseudo-neurons of one layer: r = 1 (GPT-2, NeoX, BERT) or 2 (gated: gate, up)."""

    layer: int
    seed: int
    source_neurons: torch.Tensor  # [n] long: the real neuron each pseudo-neuron copies
    rotations: torch.Tensor  # [B, M, M] Q of each block of d_mlp pseudo-neurons (B = ceil(n / d_mlp))
    source_weights: torch.Tensor  # [n, r, M] raw w of the source neurons (norm-output space)
    weights: torch.Tensor  # [n, r, M] Q w: what the pass multiplies the MLP input by
    bias: torch.Tensor  # [n, r] the source neurons' biases
    directions: torch.Tensor  # [n, r, M] effective read-in in the residual space the norm reads
    # (TransformerLens processing: LayerNorm gamma * w' centred over d_model; RMSNorm gamma * w')

    @property
    def n(self) -> int:
        return int(self.source_neurons.numel())

    @property
    def gated(self) -> bool:
        return self.weights.shape[1] == 2


def random_rotation(d: int, rng: np.random.Generator) -> torch.Tensor:
    """A Haar-random orthogonal [d, d] matrix (tests replace it with the identity)."""
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return torch.from_numpy(q * np.sign(np.diag(r))[None, :]).float()


def pseudo_read_in(handle, layer: int, n: int, seed: int) -> PseudoReadIn:
    """The n pseudo-neurons of `layer` (deterministic from (seed, layer)), with the weights the
    extraction pass uses and their read-in directions in the residual stream."""
    from intraneuron.models.weights import bias_of, neuron_weights, read_norm, weight_layout

    layout = weight_layout(handle)
    raw = neuron_weights(handle, layer, processed=False)
    d_mlp, d_model = raw.w_in.shape
    rng = np.random.default_rng([seed, layer])
    sources, rotations = [], []
    for start in range(0, n, d_mlp):  # n <= d_mlp: one block, the draws of a single rotation
        sources.append(rng.choice(d_mlp, size=min(d_mlp, n - start), replace=False))
        rotations.append(random_rotation(d_model, rng))  # [M, M]
    source = torch.from_numpy(np.concatenate(sources)).long()  # [n]
    block_of = torch.arange(n) // d_mlp  # [n]
    rotation = torch.stack(rotations)  # [B, M, M]
    block = handle.adapter.layer_path(layer)
    if raw.gated:
        b_up = bias_of(handle.module(f"{block}.{layout.w_in}"), d_mlp)
        w = torch.stack([raw.w_gate[source], raw.w_up[source]], 1)  # [n, 2, M]
        b = torch.stack([raw.b_in[source], b_up[source]], 1)  # [n, 2]
    else:
        w, b = raw.w_in[source][:, None], raw.b_in[source][:, None]  # [n, 1, M], [n, 1]
    rotated = torch.cat([w[block_of == i] @ q.T for i, q in enumerate(rotation)])  # row w -> Q_b w
    directions = rotated
    if layout.mlp_norm is not None:
        norm = read_norm(handle.module(f"{block}.{layout.mlp_norm}"), layout.norm_kind, layout.gain_offset)
        directions = rotated * norm.gain
        if norm.kind == "layernorm":
            directions = directions - directions.mean(-1, keepdim=True)
    return PseudoReadIn(layer, seed, source, rotation, w.contiguous(), rotated.contiguous(), b.contiguous(),
                        directions.contiguous())  # fmt: skip


@dataclass(frozen=True)
class Calibration:
    """pre'' = (pre' - pseudo_mean) / pseudo_sd * real_sd + real_mean; all [r, n]."""

    pseudo_mean: torch.Tensor
    pseudo_sd: torch.Tensor
    real_mean: torch.Tensor
    real_sd: torch.Tensor

    def apply(self, pre: torch.Tensor) -> torch.Tensor:
        """pre [N, r, n] -> calibrated [N, r, n]."""
        return (pre - self.pseudo_mean) / self.pseudo_sd * self.real_sd + self.real_mean

    def state_dict(self, prefix: str) -> State:
        return {f"{prefix}.calib_{k}": getattr(self, k) for k in ("pseudo_mean", "pseudo_sd", "real_mean", "real_sd")}

    @classmethod
    def load_state_dict(cls, state: State, prefix: str) -> Calibration | None:
        if f"{prefix}.calib_pseudo_mean" not in state:
            return None
        return cls(*(state[f"{prefix}.calib_{k}"].float() for k in ("pseudo_mean", "pseudo_sd", "real_mean", "real_sd")))

    def equals(self, other: Calibration) -> bool:
        return all(torch.equal(getattr(self, k).cpu(), getattr(other, k).cpu())
                   for k in ("pseudo_mean", "pseudo_sd", "real_mean", "real_sd"))  # fmt: skip


def calibrate(pseudo_pre: torch.Tensor, real_pre: torch.Tensor) -> Calibration:
    """Mean and population sd over tokens of [N, r, n] pseudo and real pre-activations; a zero sd
    (a constant column) counts as 1 so nothing divides by zero."""
    def moments(x):
        mean, sd = x.double().mean(0), x.double().std(0, correction=0)
        return mean.float(), torch.where(sd > 0, sd, torch.ones_like(sd)).float()

    (pm, ps), (rm, rs) = moments(pseudo_pre), moments(real_pre)
    return Calibration(pm, ps, rm, rs)


def activation_function(handle, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The layer's own activation function, called without its module's hooks (GPT-2's `mlp.act`
    carries the hook_post read hook, which must not fire for pseudo columns)."""
    path = ACTIVATION_PATHS.get(handle.adapter.name)
    if path is None:
        raise ValueError(f"no activation function path for architecture {handle.adapter.name!r}")
    act = handle.module(f"{handle.adapter.layer_path(layer)}.{path}")
    return act.forward if isinstance(act, torch.nn.Module) else act


class PseudoNeurons(Stat):
    """The pseudo-neurons of one layer and the spec's neuron stats over their activations.

    `add(mlp_in, token_ids, positions, window_idx)`; `state_dict(prefix)` writes `{prefix}.<key>`
    for every key of the inner stats plus the source neurons, seed and calibration. A rebuilt one
    (load_state_dict) merges but cannot `add` (it has no weights).
    """

    prefix = "pseudo"

    def __init__(
        self, read_in: PseudoReadIn | None, activation: Callable | None, stats, *, output: str = "post",
        calibration: Calibration | None = None, device: torch.device | str = "cpu",
        source_neurons: torch.Tensor | None = None, rotation_seed: torch.Tensor | None = None,
    ):
        self.read_in, self.activation, self.stats, self.output = read_in, activation, stats, output
        self.calibration = calibration
        self.folded: tuple[torch.Tensor, torch.Tensor] | None = None  # (_folded_read_in) once calibrated
        self.pending: list | None = None  # batches held until calibrated (defer_until_calibrated)
        if read_in is not None:
            self.w = read_in.weights.to(device)  # [n, r, M]
            self.b = read_in.bias.T.contiguous().to(device)  # [r, n]
            self.w_real = read_in.source_weights.to(device)  # [n, r, M]
            source_neurons, rotation_seed = read_in.source_neurons, torch.tensor([read_in.seed, read_in.layer])
        self.source_neurons, self.rotation_seed = source_neurons, rotation_seed

    @classmethod
    def build(
        cls, handle, layer: int, spec, config, device: torch.device | str = "cpu", keys=None,
        vocab_size: int | None = None, table_device: torch.device | str | None = None,
    ) -> PseudoNeurons:
        """For the engine: the spec's neuron stats over `config.pseudo_neurons` columns (type tables
        keyed by `keys`, the pass's TypeKeys, and kept on `table_device`)."""
        from intraneuron.extraction.stats import PSEUDO_STATS, CombinedStat

        read_in = pseudo_read_in(handle, layer, config.pseudo_neurons, config.pseudo_seed)
        inner = CombinedStat.build(
            [s for s in spec if s in PSEUDO_STATS], d_mlp=read_in.n, d_model=handle.d_model,
            keys=keys, vocab_size=vocab_size or handle.vocab_size, config=config, device=device,
            table_device=table_device,
        )
        output = "pre" if config.site == "mlp.hook_pre" else "post"
        return cls(read_in, activation_function(handle, layer), inner, output=output, device=device)

    def pre_activations(self, mlp_in: torch.Tensor) -> torch.Tensor:
        """Pseudo pre-activations [N, r, n] of mlp_in [N, M], uncalibrated."""
        return torch.einsum("nm,jrm->nrj", mlp_in.float(), self.w) + self.b

    def source_pre_activations(self, mlp_in: torch.Tensor) -> torch.Tensor:
        """The source neurons' real pre-activations [N, r, n]: needed only to calibrate."""
        return torch.einsum("nm,jrm->nrj", mlp_in.float(), self.w_real) + self.b

    def defer_until_calibrated(self) -> None:
        """Hold the batches `add` gets until `calibrate` (the engine visits the calibration sample's
        windows first, so the sample costs no forward pass of its own)."""
        self.pending = []

    def calibrate(self, mlp_in: torch.Tensor) -> None:
        """Fix the calibration on mlp_in [N, M], the calibration sample's kept tokens, then fold
        in the batches held since `defer_until_calibrated`."""
        if self.read_in is None:
            raise ValueError("a PseudoNeurons rebuilt from a state dict has no weights: it cannot calibrate")
        self.calibration = calibrate(self.pre_activations(mlp_in), self.source_pre_activations(mlp_in))
        self.folded = None
        held, self.pending = self.pending, None
        for batch in held or ():
            self.add(*batch)

    def activations(self, mlp_in: torch.Tensor) -> torch.Tensor:
        """Pseudo activations [N, n]; without a calibration yet, this batch fixes it."""
        if self.read_in is None:
            raise ValueError("a PseudoNeurons rebuilt from a state dict has no weights: it can merge, not add")
        if self.calibration is None:
            self.calibrate(mlp_in)
        weights, bias = self._folded_read_in()  # [r, n, M], [r, n]
        x = mlp_in.float()
        pre = [torch.addmm(bias[i], x, weights[i].T) for i in range(weights.shape[0])]  # r x [N, n]
        if self.output == "pre":
            return pre[0]
        acts = self.activation(pre[0])
        return acts.mul_(pre[1]) if len(pre) == 2 else acts

    def _folded_read_in(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The calibration folded into the read-in, weights [r, n, M] and bias [r, n]: with
        a = real_sd / pseudo_sd and c = real_mean - a pseudo_mean, pre'' = a (x . Q w + b) + c
        = x . (a Q w) + (a b + c). One GEMM per batch, where applying the calibration to the
        GEMM's output took four more passes over [N, r, n] (as long as the GEMM itself at 2,048
        pseudo-neurons). Equal to `Calibration.apply` up to float32 rounding (tested)."""
        if self.folded is None:
            cal = self.calibration
            scale = (cal.real_sd / cal.pseudo_sd).to(self.w.device)  # [r, n]
            shift = cal.real_mean.to(self.w.device) - scale * cal.pseudo_mean.to(self.w.device)
            weights = self.w.permute(1, 0, 2) * scale[..., None]  # [r, n, M]
            self.folded = weights.contiguous(), (self.b * scale + shift).contiguous()
        return self.folded

    def add(self, mlp_in: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor,
            window_idx: torch.Tensor | None = None) -> None:  # fmt: skip
        """mlp_in [N, M]; token_ids, positions, window_idx [N]."""
        if self.calibration is None and self.pending is not None:
            self.pending.append((mlp_in, token_ids, positions, window_idx))
            return
        self.stats.add(self.activations(mlp_in), None, token_ids, positions, window_idx)

    def merge(self, other: PseudoNeurons) -> None:
        if not torch.equal(self.source_neurons.cpu(), other.source_neurons.cpu()) or not torch.equal(
            self.rotation_seed.cpu(), other.rotation_seed.cpu()
        ):
            raise ValueError("cannot merge pseudo-neurons drawn with different seeds or layers")
        if self.calibration is None:
            self.calibration = other.calibration
        elif other.calibration is not None and not self.calibration.equals(other.calibration):
            raise ValueError("cannot merge pseudo-neurons calibrated differently: build the second shard "
                             "with calibration= the first's")  # fmt: skip
        self.stats.merge(other.stats)

    def state_dict(self, prefix: str | None = None) -> State:
        return self._state(prefix, self.stats.state_dict())

    def export(self, prefix: str | None = None) -> State:
        return self._state(prefix, self.stats.export())

    def _state(self, prefix: str | None, inner: State) -> State:
        p = prefix or self.prefix
        out = {f"{p}.{k}": v for k, v in inner.items()}
        out[f"{p}.source_neurons"] = self.source_neurons
        out[f"{p}.rotation_seed"] = self.rotation_seed
        if self.calibration is not None:
            out.update(self.calibration.state_dict(p))
        return out

    @classmethod
    def load_state_dict(cls, state: State, prefix: str | None = None) -> Self:
        from intraneuron.extraction.stats import CombinedStat

        p = prefix or cls.prefix
        inner = {k[len(p) + 1 :]: v for k, v in state.items() if k.startswith(f"{p}.")}
        inner = {k: v for k, v in inner.items() if k not in _EXTRAS and not k.startswith("calib_")}
        return cls(
            None, None, CombinedStat.load_state_dict(inner), calibration=Calibration.load_state_dict(state, p),
            source_neurons=state[f"{p}.source_neurons"].long(), rotation_seed=state[f"{p}.rotation_seed"].long(),
        )
