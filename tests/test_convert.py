"""Hugging Face in and out (evo/convert.py, scripts/convert.py), against transformers' own models (small random
ones built here; nothing is downloaded): a transformers folder read by evo gives transformers' logits; an evo
checkpoint written by ``to-hf`` loads in ``AutoModelForCausalLM`` and gives evo's logits (max abs diff <= 1e-4,
fp32), for every family; config.json has every field; big models are split with an index; the tokenizer
travels; bad input is one line."""

import json

import pytest
import torch
import transformers

from helpers import run_script
from test_model_families import CASES, HF_CONFIGS
import evo
from evo.convert import from_hf, to_hf
from evo.errors import CheckpointError, ConfigError

VOCAB = 101
TOL = 1e-4


def hf_folder(tmp_path, family, fields, name="hf", tokenizer=False):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
    config = HF_CONFIGS[family](**dict(base, **fields))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
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
