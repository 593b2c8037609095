"""Hugging Face in and out (evo/convert.py, scripts/convert.py), against transformers' own models (small random
ones built here; nothing is downloaded): a transformers folder read by evo gives transformers' logits; an evo
checkpoint written by ``to-hf`` loads in ``AutoModelForCausalLM`` and gives evo's logits (max abs diff <= 1e-4,
fp32), for every family; config.json has every field; big models are split with an index; the tokenizer
travels; bad input is one line."""

import json

import pytest
import torch
import transformers

from tests.helpers import run_script
from tests.test_model_families import CASES, hf_model
import evo
from evo.convert import from_hf, to_hf
from evo.errors import CheckpointError, ConfigError

VOCAB = 101
TOL = 1e-4


def hf_folder(tmp_path, family, fields, name="hf", tokenizer=False):
    model = hf_model(family, dtype=torch.float32, **fields)
    folder = tmp_path / name
    model.save_pretrained(folder)
    if tokenizer:
        make_tokenizer().save(str(folder / "tokenizer.json"))
    return folder, model


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(["def evo(x):\n    return x * 2\n"] * 20 + ["the quick brown fox"] * 20, trainer)
    return tok


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).double()


IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["llama2", "llama3", "mistral", "qwen2", "qwen3", "llama-biases"])
def test_a_hugging_face_folder_round_trips_through_evo_with_transformers_logits(tmp_path, name):
    family, fields, _ = CASES[name]
    folder, hf = hf_folder(tmp_path, family, fields)
    expected = logits(hf, IDS)
    direct = evo.load_model(folder)  # a transformers folder read directly
    assert (logits(direct, IDS) - expected).abs().max() <= TOL
    ckpt = from_hf(folder, tmp_path / "ckpt")  # an evo checkpoint of it
    model = evo.load_model(ckpt)
    assert not model.training and (logits(model, IDS) - expected).abs().max() <= TOL
    out = to_hf(ckpt, tmp_path / "back")  # and out again, loaded by transformers
    again = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (logits(again, IDS) - logits(model, IDS)).abs().max() <= TOL
    written = json.loads((out / "config.json").read_text())
    for key in ("rms_norm_eps", "rope_theta", "tie_word_embeddings", "num_key_value_heads", "head_dim",
                "max_position_embeddings", "hidden_act", "vocab_size"):
        assert key in written, key
    assert written["rms_norm_eps"] == 1e-6 and written["model_type"] == family
    assert json.loads((out / "generation_config.json").read_text()).keys() >= {"bos_token_id", "eos_token_id"}


def test_evo_rotary_pairs_are_reordered_for_transformers(tmp_path):
    """A model trained with qk_interleaved=True (GPT-J pairs) computes in transformers' halves layout the same."""
    from evo.config import config_from_dict
    from evo.model import build_model
    from evo.checkpoint import save_checkpoint

    fields = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_attention_heads=2, vocab_size=VOCAB,
                  multiple_of=32, dtype="torch.float32", qk_interleaved=True)
    model = build_model(config_from_dict({"model": fields}).model, "cpu", seed=3).eval()
    ckpt = save_checkpoint(tmp_path / "ckpts", 1, {"model": model.state_dict()}, {"step": 1}, {"model": fields}, True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(to_hf(ckpt, tmp_path / "hf"), dtype=torch.float32)
    assert (logits(hf.eval(), IDS) - logits(model, IDS)).abs().max() <= TOL


def test_a_large_model_is_split_into_shards_with_an_index_and_the_tokenizer_travels(tmp_path):
    folder, hf = hf_folder(tmp_path, "llama", {}, tokenizer=True)
    ckpt = from_hf(folder, tmp_path / "ckpt")
    result = run_script("scripts/convert.py", "to-hf", "--ckpt", ckpt, "--out", tmp_path / "out",
                        "--max-shard-size", 100_000)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == files
    again = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (logits(again, IDS) - logits(hf, IDS)).abs().max() <= TOL
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "def evo(x): return the fox"
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == make_tokenizer().encode(text).ids
    assert tokenizer.eos_token == "</s>" and tokenizer.bos_token == "<s>"


def test_bad_input_is_one_line_and_overwrites_nothing(tmp_path):
    folder, _ = hf_folder(tmp_path, "llama", {})
    ckpt = from_hf(folder, tmp_path / "ckpt")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    result = run_script("scripts/convert.py", "to-hf", "--ckpt", ckpt, "--out", tmp_path / "taken")
    assert result.returncode == 2 and result.stderr.strip() == (
        f"evo: error: output folder '{tmp_path / 'taken'}' exists and is not empty: choose another, or pass --force "
        "to replace it")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    result = run_script("scripts/convert.py", "to-hf", "--ckpt", tmp_path / "nowhere", "--out", tmp_path / "x")
    assert result.returncode == 2 and result.stderr.strip() == f"evo: error: checkpoint '{tmp_path / 'nowhere'}' does not exist"
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"holds a 'gpt2' model \(GPT2LMHeadModel\); evo reads llama, mistral, "
                                              r"qwen2, qwen3"):
        from_hf(folder, tmp_path / "other")
    with pytest.raises(ConfigError):
        to_hf(ckpt, tmp_path / "taken")
    assert not (tmp_path / "other").exists()


# InternLM2's layout, as InternLM documents it (modeling_internlm2.py): wqkv's rows are "(h gs d)", for each of
# the h kv heads gs = heads / kv heads + 2 blocks of d rows: its query heads, then its key, then its value.
def internlm2_unpack(wqkv, heads, kv_heads, d):
    blocks = wqkv.reshape(kv_heads, heads // kv_heads + 2, d, *wqkv.shape[1:])
    return [blocks[:, :-2].reshape(heads * d, *wqkv.shape[1:]), blocks[:, -2].reshape(kv_heads * d, *wqkv.shape[1:]),
            blocks[:, -1].reshape(kv_heads * d, *wqkv.shape[1:])]


def internlm2_pack(q, k, v, kv_heads):
    return torch.cat([t.reshape(kv_heads, -1, *t.shape[1:]) for t in (q, k, v)], dim=1).reshape(-1, *q.shape[1:])


def llama_from_internlm2_folder(folder):
    """transformers' Llama with the weights of an InternLM2 folder, unpacked here from the documented layout."""
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    heads, kv, hidden = config["num_attention_heads"], config["num_key_value_heads"], config["hidden_size"]
    llama = transformers.LlamaConfig(
        vocab_size=config["vocab_size"], hidden_size=hidden, intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=kv,
        rms_norm_eps=config["rms_norm_eps"], rope_theta=config["rope_theta"], attention_bias=config["bias"],
        max_position_embeddings=config["max_position_embeddings"], tie_word_embeddings=False)
    state = {}
    for file in folder.glob("*.safetensors"):
        state.update(load_file(str(file)))
    out = {"model.embed_tokens.weight": state["model.tok_embeddings.weight"], "model.norm.weight":
           state["model.norm.weight"], "lm_head.weight": state["output.weight"]}
    names = {"attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
             "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    for i in range(config["num_hidden_layers"]):
        for kind in ("weight", "bias"):
            key = f"model.layers.{i}.attention.wqkv.{kind}"
            if key in state:
                q, k, v = internlm2_unpack(state[key], heads, kv, hidden // heads)
                out.update({f"model.layers.{i}.self_attn.{p}_proj.{kind}": t for p, t in zip("qkv", (q, k, v))})
            for ours, theirs in names.items():
                if f"model.layers.{i}.{ours}.{kind}" in state:
                    out[f"model.layers.{i}.{theirs}.{kind}"] = state[f"model.layers.{i}.{ours}.{kind}"]
    model = transformers.LlamaForCausalLM(llama).eval()
    model.load_state_dict(out, strict=True)
    return model


@pytest.mark.parametrize("fields", [dict(qkv_bias=True, o_bias=True), dict(qk_interleaved=True)])
def test_internlm2_layout_written_as_documented(tmp_path, fields):
    from evo.checkpoint import save_checkpoint
    from evo.config import config_from_dict
    from evo.model import build_model

    section = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_attention_heads=2, vocab_size=VOCAB,
                   multiple_of=32, dtype="torch.float32", **fields)
    model = build_model(config_from_dict({"model": section}).model, "cpu", seed=5).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):  # biases start at 0: give them values, so that they are checked
                p.normal_(0.0, 0.3)
    ckpt = save_checkpoint(tmp_path / "ckpts", 1, {"model": model.state_dict()}, {"step": 1}, {"model": section}, True)
    result = run_script("scripts/convert.py", "to-hf", "--ckpt", ckpt, "--out", tmp_path / "hf", "--family",
                        "internlm2")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "internlm2" and config["architectures"] == ["InternLM2ForCausalLM"]
    reference = llama_from_internlm2_folder(tmp_path / "hf")
    assert (logits(reference, IDS) - logits(model, IDS)).abs().max() <= TOL
    again = evo.load_model(tmp_path / "hf")  # and read back by evo
    assert (logits(again, IDS) - logits(model, IDS)).abs().max() <= TOL


def test_an_internlm2_folder_written_from_the_documented_shape_is_read(tmp_path):
    from safetensors.torch import save_file

    folder, hf = hf_folder(tmp_path, "llama", {})
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    out = {"model.tok_embeddings.weight": state["model.embed_tokens.weight"], "model.norm.weight":
           state["model.norm.weight"], "output.weight": state["lm_head.weight"]}
    for i in range(2):
        p = f"model.layers.{i}."
        out[p + "attention.wqkv.weight"] = internlm2_pack(*(state[p + f"self_attn.{x}_proj.weight"] for x in "qkv"), 2)
        out[p + "attention.wo.weight"] = state[p + "self_attn.o_proj.weight"]
        for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            out[p + f"feed_forward.{ours}.weight"] = state[p + f"mlp.{theirs}.weight"]
        out[p + "attention_norm.weight"] = state[p + "input_layernorm.weight"]
        out[p + "ffn_norm.weight"] = state[p + "post_attention_layernorm.weight"]
    internlm2 = tmp_path / "internlm2"
    internlm2.mkdir()
    save_file(out, str(internlm2 / "model.safetensors"))
    (internlm2 / "config.json").write_text(json.dumps(dict(
        architectures=["InternLM2ForCausalLM"], model_type="internlm2", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_act="silu",
        max_position_embeddings=64, rms_norm_eps=1e-6, bias=False, rope_theta=10000.0, rope_scaling=None,
        tie_word_embeddings=False)))
    expected = logits(hf, IDS)
    assert (logits(evo.load_model(internlm2), IDS) - expected).abs().max() <= TOL
    assert (logits(evo.load_model(from_hf(internlm2, tmp_path / "ckpt")), IDS) - expected).abs().max() <= TOL


def test_generate_script_samples_from_a_hugging_face_folder(tmp_path):
    folder, hf = hf_folder(tmp_path, "qwen2", dict(tie_word_embeddings=True), tokenizer=True)
    result = run_script("scripts/generate.py", "--ckpt", folder, "--prompt", "def evo", "--tokens", "4",
                        "--temperature", "0")
    assert result.returncode == 0, result.stderr
    tok = make_tokenizer()
    prompt = tok.encode("def evo").ids
    ids = torch.tensor([prompt])
    for _ in range(4):  # transformers' greedy continuation, over the tokenizer's ids (the model's vocab is larger)
        ids = torch.cat([ids, logits(hf, ids)[:, -1, :tok.get_vocab_size()].argmax(-1, keepdim=True)], dim=1)
    assert result.stdout.strip() == "def evo" + tok.decode(ids[0, len(prompt):].tolist())


@pytest.mark.slow  # over 5 s (make test stays under 10 minutes; .ci/run runs it after)
def test_exported_files_take_the_umasks_mode(tmp_path):
    """Issue 24: safetensors writes its files 0600; every file of a to-hf folder gets 0666 less the umask, as any
    file the process opens (run under umask 022 and 027)."""
    folder, _ = hf_folder(tmp_path, "llama", {}, tokenizer=True)
    ckpt = from_hf(folder, tmp_path / "ckpt")
    for umask in (0o022, 0o027):
        out = tmp_path / f"out-{umask:o}"
        result = run_script("-c", f"import os, runpy, sys; os.umask({umask}); sys.argv = ['convert.py', 'to-hf', "
                                  f"'--ckpt', {str(ckpt)!r}, '--out', {str(out)!r}, '--max-shard-size', '100000']; "
                                  "runpy.run_path('scripts/convert.py', run_name='__main__')")
        assert result.returncode == 0, result.stderr
        modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
        assert len(modes) > 4 and set(modes.values()) == {0o666 & ~umask}, modes


@pytest.mark.slow  # over 5 s (make test stays under 10 minutes; .ci/run runs it after)
def test_a_byte_tokenizer_run_exports_a_tokenizer_transformers_loads_and_decodes(tmp_path):
    """Issue 24: a run on evo's byte tokenizer (configs/tiny.py's) writes tokenizer.json with to-hf: the same ids
    as evo's (each UTF-8 byte its value, <s> 256, </s> 257), and decoding gives the text back."""
    from evo.data.tokenizer import ByteTokenizer

    run = tmp_path / "run"
    trained = run_script("scripts/train.py", "--config", "configs/tiny.py", "data.total_steps=1", "model.num_layers=1",
                         "data.valid_max_batches=1", "monitor.sample_prompt=None", "monitor.curves=False",
                         f"monitor.run_folder={run}")
    assert trained.returncode == 0, trained.stderr
    exported = run_script("scripts/convert.py", "to-hf", "--ckpt", run / "checkpoints", "--out", tmp_path / "hf")
    assert exported.returncode == 0, exported.stderr
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in ("def f(x):\n    return x  # café, 東京 ✓", " leading space", "\t\r\n"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == ByteTokenizer().encode(text) == list(text.encode("utf-8"))
        assert tokenizer.decode(ids) == text
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
    assert tokenizer.convert_tokens_to_ids(["<s>", "</s>"]) == [256, 257]
