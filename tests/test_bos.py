"""BOS at the start of every window, and the default extraction never counting position 0 (the sink)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from intraneuron.corpus import bos_token_id, build_windows
from intraneuron.corpus.config import CorpusConfig
from intraneuron.errors import ConfigError
from intraneuron.extraction import ExtractionConfig, extract_profiles

CONF = Path(__file__).resolve().parents[1] / "conf"


def build(text, tokenizer, root, **kwargs):
    return build_windows([text], tokenizer, window_len=16, max_tokens=512, cache_root=root,
                         source_key="emma", **kwargs)  # fmt: skip


def word_tokenizer():
    """A tokenizer with EOS and no BOS (like BERT's WordPiece has no BOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[EOS]": 1, **{w: i + 2 for i, w in enumerate("the a of and to in".split())}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]")


def test_windows_start_with_bos(tiny_gpt2, austen_text, tmp_path):
    tok = tiny_gpt2.tokenizer
    assert bos_token_id(tok) == tok.bos_token_id == tok.eos_token_id  # GPT-2: <|endoftext|>
    plain = build(austen_text, tok, tmp_path, prepend_bos=False)
    with_bos = build(austen_text, tok, tmp_path, prepend_bos=True)
    assert (with_bos.ids[:, 0] == tok.bos_token_id).all()
    stream = np.asarray(plain.ids).reshape(-1)
    body = np.asarray(with_bos.ids)[:, 1:].reshape(-1)  # window_len - 1 corpus tokens each
    np.testing.assert_array_equal(body, stream[: body.size])
    assert with_bos.content_hash != plain.content_hash


def test_prepend_bos_false_gives_the_old_windows(tiny_gpt2, austen_text, tmp_path):
    tok = tiny_gpt2.tokenizer
    plain = build(austen_text, tok, tmp_path, prepend_bos=False)
    ids = tok(austen_text, add_special_tokens=False)["input_ids"]
    n = min(len(ids) // 16, 512 // 16)
    expected = np.asarray(ids[: n * 16], dtype=np.uint32).reshape(n, 16)
    np.testing.assert_array_equal(plain.ids, expected)
    digest = hashlib.sha256(np.ascontiguousarray(expected).data)
    digest.update(b"window_len=16")
    assert plain.content_hash == digest.hexdigest()  # the hash windows had before the option


def test_no_bos_token_means_no_bos(austen_text, tmp_path):
    tok = word_tokenizer()
    assert bos_token_id(tok) is None
    text = "the a of and to in " * 40
    a = build(text, tok, tmp_path / "a", prepend_bos=True)
    b = build(text, tok, tmp_path / "b", prepend_bos=False)
    np.testing.assert_array_equal(a.ids, b.ids)
    assert a.content_hash == b.content_hash


def test_prepend_bos_is_the_default_and_checked():
    assert CorpusConfig().prepend_bos is True
    for path in sorted((CONF / "corpus").glob("*.yaml")):
        assert yaml.safe_load(path.read_text())["prepend_bos"] is True, path.name
    with pytest.raises(ConfigError, match="corpus.prepend_bos='yes'") as err:
        CorpusConfig(prepend_bos="yes").validate()
    assert "true or false" in err.value.allowed


def default_extraction(**change) -> ExtractionConfig:
    fields = yaml.safe_load((CONF / "extraction" / "default.yaml").read_text())
    fields.pop("device")
    return ExtractionConfig(**{**fields, "progress": False, "top_k": 5, **change})


def test_default_extraction_never_counts_position_zero(tiny_gpt2, austen_text, tmp_path):
    settings = default_extraction()
    assert settings.skip_first_positions == 1 and settings.input_site == "hook_resid_mid"
    assert settings.pseudo_neurons == 2048 and settings.pseudo_seed == 0
    settings.validate()
    windows = build(austen_text, tiny_gpt2.tokenizer, tmp_path, prepend_bos=True)
    spec = ("fold_token_types", "input_token_types", "moments", "token_types", "topk")
    profile = extract_profiles(tiny_gpt2, windows, [0], settings, cache=None, stats=spec)[0]
    W, T = windows.ids.shape
    assert profile.n_tokens == W * (T - 1) == int(profile["act_count"])
    assert (profile.numpy("topk_positions") % T != 0).all()
    counts = dict(zip(profile.numpy("type_ids").tolist(), profile.numpy("type_count").tolist(), strict=True))
    bos = tiny_gpt2.tokenizer.bos_token_id
    assert counts.get(bos, 0) == int((np.asarray(windows.ids)[:, 1:] == bos).sum())  # BOS only where the text has it
    assert int(profile.numpy("resid_count").sum()) == int(profile.numpy("fold_count").sum()) == W * (T - 1)
    assert profile.input_site == "blocks.0.hook_resid_mid"


def test_bad_extraction_values_name_the_key():
    for change, key in (({"pseudo_neurons": -1}, "extraction.pseudo_neurons"),
                        ({"pseudo_seed": -1}, "extraction.pseudo_seed"),
                        ({"pseudo_neurons": True}, "extraction.pseudo_neurons"),
                        ({"input_site": "hook_resid_post"}, "extraction.input_site")):  # fmt: skip
        with pytest.raises(ConfigError) as err:
            default_extraction(**change).validate()
        assert err.value.key == key and err.value.value == next(iter(change.values()))
    default_extraction(pseudo_neurons=0).validate()  # 0 = no pseudo-neurons, refused only if requested
    from intraneuron.extraction.stats import resolve_stats

    with pytest.raises(ConfigError, match="extraction.pseudo_neurons=0"):
        resolve_stats(["topk", "pseudo_neurons"], default_extraction(pseudo_neurons=0))
