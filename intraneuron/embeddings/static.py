"""Read one checkpoint's input-embedding matrix alone, without building (or even reading) the model.

A safetensors file starts with a JSON header of tensor offsets, so `safe_open(...).get_tensor(name)`
memory-maps the file and copies out only that tensor: GPT-2 XL's `wte.weight` (50257 x 1600, 322 MB)
comes out of its 6.4 GB checkpoint with memory about the size of the tensor
(benchmarks/static_embeddings.py measures it).

`source` is one of
- a `.safetensors` file;
- a folder holding `model.safetensors`, or shards plus `model.safetensors.index.json` (only the shard
  that holds the tensor is opened);
- a Hugging Face hub id ("gpt2-xl", "openai-community/gpt2-xl"), fetched into the usual HF cache.
No extra cache of our own: the tensor is already stored in a file we can read without overhead.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from intraneuron.errors import ConfigError, MissingAssetError

# Input-embedding tensor names across the architectures we meet, most common first.
KNOWN_EMBEDDING_TENSORS = (
    "wte.weight",  # GPT-2 checkpoints as published (openai-community/gpt2*)
    "transformer.wte.weight",  # GPT-2 saved from GPT2LMHeadModel, GPT-Neo
    "model.embed_tokens.weight",  # Llama, Mistral, SmolLM2, Qwen, Gemma
    "gpt_neox.embed_in.weight",  # Pythia / GPT-NeoX
    "embeddings.word_embeddings.weight",  # BERT saved from BertModel
    "bert.embeddings.word_embeddings.weight",  # BERT saved from a task head
)

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"


def load_embedding_matrix(
    source: str | Path,
    *,
    tensor_name: str | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
) -> torch.Tensor:
    """The input-embedding matrix of a checkpoint as float32 `[vocab, d_model]`, read alone.

    `tensor_name=None` takes the first of KNOWN_EMBEDDING_TENSORS present in the checkpoint.
    `revision` and `local_files_only` apply to hub ids only.
    """
    file, name = _locate_tensor(source, tensor_name, revision, local_files_only)
    with safe_open(str(file), framework="pt") as checkpoint:
        if name not in checkpoint.keys():
            raise _tensor_not_found(name, file, list(checkpoint.keys()))
        matrix = checkpoint.get_tensor(name)
    if matrix.ndim != 2:
        raise ValueError(
            f"{name} in {file} has shape {tuple(matrix.shape)}: expected [vocab, d_model]"
        )
    return matrix.float()  # no copy when it is float32 already


def _locate_tensor(
    source: str | Path, tensor_name: str | None, revision: str | None, local_files_only: bool
) -> tuple[Path, str]:
    """(file holding the tensor, tensor name), resolving folders, shard indexes and hub ids."""
    path = Path(source).expanduser()
    if path.is_file():
        return path, tensor_name or _pick_tensor_name(path, _tensor_names(path))
    if path.is_dir():
        if (path / SINGLE_FILE).is_file():
            file = path / SINGLE_FILE
            return file, tensor_name or _pick_tensor_name(file, _tensor_names(file))
        if (path / SHARD_INDEX).is_file():
            return _shard_for(path / SHARD_INDEX, tensor_name, lambda shard: path / shard)
        found = sorted(p.name for p in path.iterdir())
        raise MissingAssetError(
            f"{path} holds neither {SINGLE_FILE} nor {SHARD_INDEX}; it contains: {found[:20]}"
        )
    if _looks_like_local_path(str(source)):
        raise MissingAssetError(f"embedding checkpoint {source} does not exist")
    return _locate_on_hub(str(source), tensor_name, revision, local_files_only)


def _looks_like_local_path(source: str) -> bool:
    """Hub ids are "name" or "owner/name"; anything else that does not exist is a missing file."""
    return (
        source.endswith(".safetensors")
        or source.startswith((".", "/", "~"))
        or source.count("/") > 1
        or "\\" in source
    )


def _tensor_names(file: Path) -> list[str]:
    with safe_open(str(file), framework="pt") as checkpoint:
        return list(checkpoint.keys())


def _pick_tensor_name(where: Path | str, names: list[str]) -> str:
    for known in KNOWN_EMBEDDING_TENSORS:
        if known in names:
            return known
    raise MissingAssetError(
        f"no input-embedding tensor in {where}: looked for {list(KNOWN_EMBEDDING_TENSORS)}, "
        f"found {_preview(names)}; pass tensor_name= (embedding.tensor_name) to choose one"
    )


def _tensor_not_found(name: str, where: Path | str, names: list[str]) -> ConfigError:
    return ConfigError("embedding.tensor_name", name, f"a tensor of {where}: {_preview(names)}")


def _preview(names: list[str], limit: int = 30) -> str:
    shown = sorted(names)[:limit]
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return f"{shown}{more}"


def _shard_for(index_file: Path, tensor_name: str | None, shard_path) -> tuple[Path, str]:
    """Find, through the shard index's weight_map, the one shard that holds the tensor."""
    weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
    name = tensor_name or _pick_tensor_name(index_file, list(weight_map))
    if name not in weight_map:
        raise _tensor_not_found(name, index_file, list(weight_map))
    return Path(shard_path(weight_map[name])), name


def _locate_on_hub(
    repo_id: str, tensor_name: str | None, revision: str | None, local_files_only: bool
) -> tuple[Path, str]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    def download(filename: str) -> Path:
        return Path(
            hf_hub_download(repo_id, filename, revision=revision, local_files_only=local_files_only)
        )

    where = f"hub repo {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        try:
            file = download(SINGLE_FILE)
            return file, tensor_name or _pick_tensor_name(where, _tensor_names(file))
        except EntryNotFoundError:
            index_file = download(SHARD_INDEX)
            return _shard_for(index_file, tensor_name, download)
    except (EntryNotFoundError, HFValidationError, OSError) as error:
        hint = (
            "it is not in the local Hugging Face cache (local_files_only=True)"
            if local_files_only
            else "downloading it failed (no network, a private/gated repo, or a wrong id?)"
        )
        raise MissingAssetError(
            f"cannot get {SINGLE_FILE} or {SHARD_INDEX} from {where}: {hint}. "
            f"Pass a local .safetensors file or folder instead. ({type(error).__name__}: {error})"
        ) from error
