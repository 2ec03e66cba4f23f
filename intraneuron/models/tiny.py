"""Tiny random-initialised models saved with a real tokenizer: tests and smoke runs, no download.

Each model seeds torch and builds a 3-layer model with d_model 32 (MODELS); a builder (BUILDERS)
saves its weights (safetensors), config and tokenizer into `directory` and returns it, so
`load_model(str(path))` reads it like any local checkpoint. The decoders use the real GPT-2 BPE
(vocab 50257), BERT uses MiniLM's WordPiece. Configs name them as "tiny-gpt2", "tiny-llama", ...:
`tiny_model` builds one once into the cache.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from transformers import AutoTokenizer

from intraneuron import paths
from intraneuron.models.packaged import InMemory, gpt2_tokenizer_dir, minilm_dir, save_to_cache

GPT2_VOCAB = 50257
GPT2_EOS = 50256
BERT_VOCAB = 30522


def _save(model: torch.nn.Module, tokenizer_dir: Path, directory: Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(directory))
    return directory


def gpt2_model(*, n_layers: int = 3, d_model: int = 32, seed: int = 0) -> tuple[torch.nn.Module, Path]:
    """GPT-2 (d_mlp = 4 * d_model since n_inner is unset) with the real GPT-2 tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=GPT2_VOCAB, n_positions=256, n_embd=d_model, n_layer=n_layers, n_head=4,
        bos_token_id=GPT2_EOS, eos_token_id=GPT2_EOS,
    )
    return GPT2LMHeadModel(config), gpt2_tokenizer_dir()


def neox_model(*, n_layers: int = 3, d_model: int = 32, seed: int = 0) -> tuple[torch.nn.Module, Path]:
    """GPT-NeoX (Pythia layout: parallel attention + MLP, rotary) with the GPT-2 tokenizer."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=GPT2_VOCAB, hidden_size=d_model, num_hidden_layers=n_layers,
        num_attention_heads=4, intermediate_size=2 * d_model, max_position_embeddings=256,
        bos_token_id=GPT2_EOS, eos_token_id=GPT2_EOS,
    )
    return GPTNeoXForCausalLM(config), gpt2_tokenizer_dir()


def llama_model(*, n_layers: int = 3, d_model: int = 32, seed: int = 0) -> tuple[torch.nn.Module, Path]:
    """Llama (gated SiLU MLP, RMSNorm, grouped-query attention) with the GPT-2 tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=GPT2_VOCAB, hidden_size=d_model, intermediate_size=3 * d_model,
        num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, bos_token_id=GPT2_EOS, eos_token_id=GPT2_EOS,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config), gpt2_tokenizer_dir()


def bert_model(*, n_layers: int = 3, d_model: int = 32, seed: int = 0) -> tuple[torch.nn.Module, Path]:
    """BERT saved as BertForMaskedLM (like real checkpoints) with MiniLM's uncased WordPiece."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=BERT_VOCAB, hidden_size=d_model, num_hidden_layers=n_layers,
        num_attention_heads=4, intermediate_size=2 * d_model, max_position_embeddings=256,
    )
    return BertForMaskedLM(config), minilm_dir()


MODELS = {"gpt2": gpt2_model, "gpt_neox": neox_model, "llama": llama_model, "bert": bert_model}


def build_and_save(arch: str, directory: Path, **sizes) -> Path:
    """The tiny model of `arch` (sizes: n_layers, d_model, seed) saved into `directory`."""
    return _save(*MODELS[arch](**sizes), directory)


def tiny_gpt2(directory: Path, **sizes) -> Path:
    return build_and_save("gpt2", directory, **sizes)


BUILDERS = {arch: partial(build_and_save, arch) for arch in MODELS}
TINY_MODELS = {f"tiny-{arch.replace('_', '-')}": arch for arch in MODELS}  # config name -> arch
# the same tiny GPT-2 from other seeds: smoke runs of analyses of several models (universal neurons)
TINY_MODELS |= {f"tiny-gpt2-seed{seed}": "gpt2" for seed in (1, 2)}


def tiny_model(name: str) -> Path | InMemory:
    """Directory of the named tiny model ("tiny-gpt2", ...), built once (seed 0, or N for a name
    ending in -seedN) into the cache; the model itself when the cache cannot keep it."""
    seed = int(name.rpartition("-seed")[2]) if "-seed" in name else 0
    target = paths.cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    model, tokenizer_dir = MODELS[TINY_MODELS[name]](seed=seed)
    if save_to_cache(target, lambda folder: _save(model, tokenizer_dir, folder)):
        return target
    return InMemory(model, AutoTokenizer.from_pretrained(str(tokenizer_dir)))
