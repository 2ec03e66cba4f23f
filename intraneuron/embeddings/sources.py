"""Three ways to give each core token a vector, behind one interface.

- StaticEmbeddings: rows of any checkpoint's input-embedding matrix (GPT-2 XL's `wte` by default, as
  in Pichat et al. 2025), reached from the analysed tokenizer through a TokenMapping.
- ModelEmbeddings: rows of the analysed model's own input-embedding matrix.
- LayerInputEmbeddings: the mean residual-stream vector entering the analysed layer at the token's
  occurrences, from per-type sums and counts gathered during extraction.

Every source answers `embed(token_ids) -> (X [n, d] float32, valid [n] bool)`; invalid rows are zero,
so a caller can drop them and report how many it dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from intraneuron.embeddings.static import load_embedding_matrix
from intraneuron.embeddings.token_mapping import TokenMapping, map_tokens
from intraneuron.errors import ConfigError, MissingAssetError

logger = logging.getLogger(__name__)

SOURCE_KINDS = ("static", "model_input", "layer_input")
MULTI_TOKEN_POLICIES = ("mean", "drop")
DEFAULT_STATIC_CHECKPOINT = "openai-community/gpt2-xl"


@runtime_checkable
class EmbeddingSource(Protocol):
    name: str

    def embed(self, token_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[n] analysed-tokenizer ids -> (X [n, d] float32, valid [n] bool); invalid rows are zero."""
        ...


def _as_float32_numpy(matrix: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(matrix, torch.Tensor):
        matrix = matrix.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(matrix, dtype=np.float32)


def _check_ids(token_ids: np.ndarray, vocab_size: int, source: str) -> np.ndarray:
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)  # [n]
    if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)][:5].tolist()
        raise ValueError(f"{source}: token ids {bad} are outside [0, {vocab_size})")
    return ids


class StaticEmbeddings:
    """Rows of a static embedding matrix, looked up through a mapping between tokenizers.

    `mapping=None` means the analysed ids index `matrix` directly (same tokenizer). Tokens that map
    to several checkpoint tokens get the mean of their vectors (`multi_token="mean"`) or are marked
    invalid (`"drop"`).
    """

    def __init__(
        self,
        matrix: torch.Tensor | np.ndarray,
        mapping: TokenMapping | None = None,
        multi_token: str = "mean",
        name: str = "static",
    ):
        if multi_token not in MULTI_TOKEN_POLICIES:
            raise ConfigError("embedding.multi_token", multi_token, MULTI_TOKEN_POLICIES)
        self.matrix = _as_float32_numpy(matrix)  # [target_vocab, d]
        self.mapping, self.multi_token, self.name = mapping, multi_token, name
        if mapping is None:
            return
        self._indptr, self._indices = mapping.csr()  # [n_mapped + 1], [total target ids]
        if len(self._indices) and self._indices.max() >= len(self.matrix):
            raise ValueError(
                f"{name}: the mapping points at token id {int(self._indices.max())} but the embedding "
                f"matrix has {len(self.matrix)} rows: the embedding tokenizer does not match the checkpoint"
            )
        # Analysed id -> row of the mapping (-1: not in the mapping).
        self._row_of = np.full(int(mapping.source_ids.max(initial=-1)) + 1, -1, dtype=np.int64)
        self._row_of[mapping.source_ids] = np.arange(len(mapping.source_ids))
        logger.info("%s: %s", name, mapping.summary())

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path = DEFAULT_STATIC_CHECKPOINT,
        *,
        analysed_tokenizer,
        embedding_tokenizer=None,
        tensor_name: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        multi_token: str = "mean",
    ) -> StaticEmbeddings:
        """Load the checkpoint's embedding matrix alone and map the analysed vocabulary onto it.

        `embedding_tokenizer`: a tokenizer object, a path / hub id to load one from, or None to load
        it from the checkpoint's own folder or hub repo.
        """
        if multi_token not in MULTI_TOKEN_POLICIES:
            raise ConfigError("embedding.multi_token", multi_token, MULTI_TOKEN_POLICIES)
        if embedding_tokenizer is None or isinstance(embedding_tokenizer, str | Path):
            embedding_tokenizer = _load_tokenizer(
                embedding_tokenizer or checkpoint, revision, local_files_only
            )
        matrix = load_embedding_matrix(
            checkpoint,
            tensor_name=tensor_name,
            revision=revision,
            local_files_only=local_files_only,
        )
        mapping = map_tokens(analysed_tokenizer, embedding_tokenizer)
        return cls(matrix, mapping, multi_token, name=f"static:{checkpoint}")

    def embed(self, token_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.mapping is None:
            ids = _check_ids(token_ids, len(self.matrix), self.name)
            return self.matrix[ids].copy(), np.ones(len(ids), dtype=bool)
        ids = _check_ids(token_ids, len(self._row_of), self.name)
        rows = self._row_of[ids]  # [n], -1 where the id was left out of the mapping
        mapped = rows >= 0
        starts = np.where(mapped, self._indptr[np.maximum(rows, 0)], 0)  # [n]
        lengths = np.where(mapped, self._indptr[np.maximum(rows, 0) + 1] - starts, 0)  # [n]
        if self.multi_token == "drop":
            lengths = np.where(lengths == 1, lengths, 0)
        valid = lengths > 0

        # Flatten every valid token's target ids, sum each token's segment, divide by its length.
        offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        flat_targets = self._indices[np.repeat(starts, lengths) + offsets]  # [total]
        segment_starts = (np.cumsum(lengths) - lengths)[valid]  # [n_valid]
        X = np.zeros((len(ids), self.matrix.shape[1]), dtype=np.float32)  # [n, d]
        if valid.any():
            sums = np.add.reduceat(
                self.matrix[flat_targets], segment_starts, axis=0
            )  # [n_valid, d]
            X[valid] = sums / lengths[valid, None]
        return X, valid


class ModelEmbeddings:
    """Rows of the analysed model's own input-embedding matrix (ids need no mapping)."""

    def __init__(self, weight: torch.Tensor | np.ndarray | torch.nn.Embedding, name: str = "model"):
        if isinstance(weight, torch.nn.Embedding):
            weight = weight.weight
        self.matrix = _as_float32_numpy(weight)  # [vocab, d_model]
        self.name = name

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> ModelEmbeddings:
        """Any Hugging Face model: `get_input_embeddings()` finds wte / embed_tokens / embed_in."""
        return cls(model.get_input_embeddings())

    def embed(self, token_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = _check_ids(token_ids, len(self.matrix), self.name)
        return self.matrix[ids].copy(), np.ones(len(ids), dtype=bool)


class LayerInputEmbeddings:
    """Mean residual-stream input of the layer over each token's occurrences: resid_sum / counts.

    Tokens never seen in the corpus (count 0) are invalid.
    """

    def __init__(
        self,
        resid_sum: torch.Tensor | np.ndarray,
        counts: torch.Tensor | np.ndarray,
        name: str = "layer_input",
    ):
        if isinstance(resid_sum, torch.Tensor):
            resid_sum = resid_sum.detach().cpu().numpy()
        if isinstance(counts, torch.Tensor):
            counts = counts.detach().cpu().numpy()
        self.resid_sum = np.asarray(resid_sum)  # [vocab, d_model], float32 or float64
        self.counts = np.asarray(counts).reshape(-1)  # [vocab] int
        if self.resid_sum.ndim != 2 or len(self.resid_sum) != len(self.counts):
            raise ValueError(
                f"{name}: resid_sum {self.resid_sum.shape} and counts {self.counts.shape} must be "
                "[vocab, d_model] and [vocab]"
            )
        self.name = name

    def embed(self, token_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = _check_ids(token_ids, len(self.counts), self.name)
        counts = self.counts[ids]  # [n]
        valid = counts > 0
        X = np.zeros((len(ids), self.resid_sum.shape[1]), dtype=np.float32)  # [n, d_model]
        X[valid] = self.resid_sum[ids[valid]] / counts[valid, None]
        return X, valid


def _load_tokenizer(source: str | Path, revision: str | None, local_files_only: bool):
    from transformers import AutoTokenizer

    path = Path(source).expanduser()
    location = str(path.parent if path.is_file() else (path if path.exists() else source))
    try:
        return AutoTokenizer.from_pretrained(
            location, revision=revision, local_files_only=local_files_only
        )
    except (OSError, ValueError) as error:
        raise MissingAssetError(
            f"cannot load the embedding checkpoint's tokenizer from {location!r}; set "
            f"embedding.tokenizer to a tokenizer folder or hub id ({type(error).__name__}: {error})"
        ) from error


def embedding_source_from_config(
    cfg: Mapping[str, Any],
    *,
    analysed_tokenizer=None,
    model: torch.nn.Module | None = None,
    resid_sum: torch.Tensor | np.ndarray | None = None,
    counts: torch.Tensor | np.ndarray | None = None,
) -> EmbeddingSource:
    """Build the source named by `cfg` (the `embedding` config group), checking it before loading.

    cfg keys: `source` ("static" | "model_input" | "layer_input"); for "static" also `checkpoint`,
    `tokenizer`, `tensor_name`, `revision`, `local_files_only`, `multi_token` ("mean" | "drop").
    The caller passes what the source needs: the analysed tokenizer (static), the model (model), or
    the extraction's layer-input sums and counts (layer_input).
    """
    kind = cfg.get("source", "static")
    if kind not in SOURCE_KINDS:
        raise ConfigError("embedding.source", kind, SOURCE_KINDS)
    if kind == "static":
        multi_token = cfg.get("multi_token", "mean")
        if multi_token not in MULTI_TOKEN_POLICIES:
            raise ConfigError("embedding.multi_token", multi_token, MULTI_TOKEN_POLICIES)
        if analysed_tokenizer is None:
            raise ValueError("embedding.source='static' needs the analysed model's tokenizer")
        return StaticEmbeddings.from_checkpoint(
            cfg.get("checkpoint") or DEFAULT_STATIC_CHECKPOINT,
            analysed_tokenizer=analysed_tokenizer,
            embedding_tokenizer=cfg.get("tokenizer"),
            tensor_name=cfg.get("tensor_name"),
            revision=cfg.get("revision"),
            local_files_only=bool(cfg.get("local_files_only", False)),
            multi_token=multi_token,
        )
    if kind == "model_input":
        if model is None:
            raise ValueError("embedding.source='model_input' needs the analysed model")
        return ModelEmbeddings.from_model(model)
    if resid_sum is None or counts is None:
        raise ValueError(
            "embedding.source='layer_input' needs the extraction's resid_sum and counts"
        )
    return LayerInputEmbeddings(resid_sum, counts)
