"""A model the cache cannot keep (a full or read-only disk, said as an OSError or as safetensors' own
SafetensorError) is still returned, from memory, with one warning naming the folder and the error;
nothing is left in the cache, so the next run builds it again."""

from __future__ import annotations

import hashlib
import logging

import pytest
import torch
from safetensors import SafetensorError

from intraneuron.models import loading, tiny
from intraneuron.models.loading import load_model

ERRORS = {
    "OSError": OSError(28, "No space left on device"),
    "SafetensorError": SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"),
}
HELLO_WORLD = torch.tensor([[15496, 995]])  # "Hello world" in GPT-2's BPE


def _refuse(how: str):
    def save(*args, **kwargs):
        raise ERRORS[how]

    return save


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("intraneuron")]


def _logits(handle) -> torch.Tensor:
    with torch.no_grad():
        return handle.model(HELLO_WORLD).logits


@pytest.mark.parametrize("how", list(ERRORS))
def test_a_tiny_model_the_cache_cannot_keep_is_used_from_memory(how, tiny_model_dirs, tmp_path, monkeypatch, caplog):
    saved = load_model(str(tiny_model_dirs["gpt2"]))  # the same seed, saved and loaded back
    monkeypatch.setenv("INTRANEURON_CACHE", str(tmp_path))
    save = tiny._save
    monkeypatch.setattr(tiny, "_save", _refuse(how))
    handle = load_model("tiny-gpt2")
    assert torch.equal(_logits(handle), _logits(saved))
    assert handle.tokenizer("Hello world")["input_ids"] == HELLO_WORLD.tolist()[0]
    (warning,) = _warnings(caplog)
    assert str(tmp_path / "models" / "tiny-gpt2") in warning and str(ERRORS[how]) in warning
    assert list((tmp_path / "models").iterdir()) == []  # no half-written folder

    monkeypatch.setattr(tiny, "_save", save)  # the next run: the disk takes it
    again = load_model("tiny-gpt2")
    assert (tmp_path / "models" / "tiny-gpt2" / "config.json").is_file()
    assert torch.equal(_logits(again), _logits(saved))


@pytest.mark.parametrize("how", list(ERRORS))
def test_a_de_quantised_model_the_cache_cannot_keep_is_used_from_memory(how, tiny_model_dirs, tmp_path, monkeypatch,
                                                                       caplog):  # fmt: skip
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # a tiny Llama stands in for the de-quantised GGUF (the real one takes 15 s): the save is the subject
    folder = str(tiny_model_dirs["llama"])
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"a GGUF file")
    monkeypatch.setenv("INTRANEURON_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "load_gguf", lambda path: (model, tokenizer))
    monkeypatch.setattr(loading, "save_file", _refuse(how))
    handle = load_model(str(gguf))
    assert handle.model is model and handle.tokenizer is tokenizer  # the de-quantised model itself
    assert torch.equal(_logits(handle), _logits(load_model(folder)))
    assert handle.fingerprint == "sha256:" + hashlib.sha256(gguf.read_bytes()).hexdigest()
    (warning,) = _warnings(caplog)
    target = tmp_path / "cache" / "models" / handle.fingerprint.removeprefix("sha256:")
    assert str(target) in warning and str(ERRORS[how]) in warning
    assert list(target.parent.iterdir()) == []  # no half-written folder: the next run de-quantises again
