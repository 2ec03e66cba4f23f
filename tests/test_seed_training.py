"""experiments/universal_seeds/train.py: a very small run of the seed-model recipe (seconds)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

TRAIN_PY = Path(__file__).resolve().parents[1] / "experiments" / "universal_seeds" / "train.py"


@pytest.fixture(scope="module")
def recipe():
    name = "universal_seeds_train"
    spec = importlib.util.spec_from_file_location(name, TRAIN_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_run(recipe, austen_text, tmp_path_factory):
    """A 300-token BPE and 1-layer models from seeds 0, 1 and 0 again, two of them saved."""
    text = austen_text[:20_000]
    tokenizer = recipe.train_tokenizer([text], vocab_size=300)
    stream = recipe.encode_corpus(tokenizer, [text[:10_000], text[10_000:]])
    train_blocks, val_blocks = recipe.split_blocks(stream, 32, val_every=10)
    settings = recipe.TrainSettings(
        n_layer=1, n_embd=32, n_head=4, n_positions=32, batch_size=8, tokens=8 * 32 * 40,
        warmup_steps=4, log_every=0,
    )
    runs = {}
    for key, seed in (("a", 0), ("b", 1), ("a_again", 0)):
        runs[key] = recipe.train_model(
            seed, train_blocks, val_blocks, len(tokenizer), tokenizer.eos_token_id, settings,
            log=lambda *_: None,
        )
    root = tmp_path_factory.mktemp("seed-models")
    dirs = {
        key: recipe.save_model(runs[key][0], tokenizer, root / key, {"seed": runs[key][1].seed})
        for key in ("a", "b")
    }
    return tokenizer, stream, settings, runs, dirs


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_tokenizer_is_deterministic_byte_level_with_eos(recipe, austen_text, small_run):
    tokenizer, stream, *_ = small_run
    again = recipe.train_tokenizer([austen_text[:20_000]], vocab_size=300)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert len(tokenizer) == 300
    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>"
    assert (stream == tokenizer.eos_token_id).sum() == 1  # one separator between the two documents
    sample = "Emma Woodhouse, handsome, clever, and rich — naïve!"
    assert tokenizer.decode(tokenizer(sample)["input_ids"]) == sample  # byte level: no unknowns


def test_split_is_disjoint_and_seed_independent(recipe, small_run):
    _, stream, settings, *_ = small_run
    train, val = recipe.split_blocks(stream, 32, val_every=10)
    assert train.shape[1] == val.shape[1] == 33
    assert len(train) + len(val) == len(stream) // 33
    assert len(val) == (len(stream) // 33) // 10


def test_loss_decreases(small_run):
    *_, runs, _ = small_run
    for _, result in runs.values():
        losses = result.train_losses
        assert len(losses) == 40
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
        assert result.val_loss < result.val_loss_init - 0.5


def test_seeds_differ_and_same_seed_repeats(small_run):
    *_, runs, _ = small_run
    a, b, a_again = (_weights(runs[k][0]) for k in ("a", "b", "a_again"))
    assert all(torch.equal(a[name], a_again[name]) for name in a)
    assert runs["a"][1].train_losses == runs["a_again"][1].train_losses
    assert not torch.equal(a["transformer.h.0.mlp.c_fc.weight"], b["transformer.h.0.mlp.c_fc.weight"])


def test_saved_directories_load_through_the_framework(small_run):
    from intraneuron.corpus import tokenizer_fingerprint
    from intraneuron.models.loading import load_model

    tokenizer, _, settings, runs, dirs = small_run
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (dirs["a"] / name).read_bytes() == (dirs["b"] / name).read_bytes()
    assert (dirs["a"] / "model.safetensors").is_file()
    assert json.loads((dirs["b"] / "training.json").read_text()) == {"seed": 1}

    handles = {key: load_model(str(path)) for key, path in dirs.items()}
    for key, handle in handles.items():
        assert handle.n_layers == 1 and handle.d_mlp == 4 * settings.n_embd
        assert handle.vocab_size == len(tokenizer)
        assert handle.tokenizer.eos_token_id == tokenizer.eos_token_id
        saved = _weights(runs[key][0])
        loaded = handle.model.state_dict()
        assert all(torch.equal(saved[name], loaded[name]) for name in saved)
    assert tokenizer_fingerprint(handles["a"].tokenizer) == tokenizer_fingerprint(handles["b"].tokenizer)
    assert handles["a"].fingerprint != handles["b"].fingerprint


def test_command_line_writes_every_seed(recipe, tmp_path):
    results = recipe.main([
        "--out", str(tmp_path), "--seeds", "3", "4", "--corpus", "austen", "--max-chars", "8000",
        "--vocab-size", "280", "--tokens", str(4 * 16 * 5), "--layers", "1", "--width", "16",
        "--ctx", "16", "--batch-size", "4", "--val-every", "5", "--log-every", "0", "--threads", "1",
        "--device", "cpu",
    ])
    assert [r.seed for r in results] == [3, 4]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert sorted(summary["models"]) == ["seed3", "seed4"]
    meta = json.loads((tmp_path / "seed4" / "training.json").read_text())
    assert meta["seed"] == 4 and meta["data_seed"] == 4 and meta["settings"]["n_layer"] == 1
    assert (tmp_path / "seed3" / "config.json").is_file()
