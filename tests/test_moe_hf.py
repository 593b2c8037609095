"""Mixture-of-experts models in and out of Hugging Face (issue 25): Qwen3-MoE, Mixtral and Qwen2-MoE folders as
transformers' save_pretrained writes them (experts one by one) are read by evo.load_model and from-hf with
transformers' logits, and written back by to-hf into folders transformers loads with the same logits. Small random
models built here; nothing downloaded."""

import json

import pytest
import torch
import transformers
from safetensors import safe_open

import evo
from evo.convert import from_hf, to_hf
from evo.errors import CheckpointError
from tests.helpers import run_script
from tests.parallel.test_hf_start import randomize
from tests.test_model_families import hf_model

VOCAB, TOL = 101, 1e-4
CASES = {  # name -> (family, config fields)
    "qwen3_moe": ("qwen3_moe", dict(norm_topk_prob=True)),
    "qwen3_moe-sparse-step": ("qwen3_moe", dict(norm_topk_prob=False, decoder_sparse_step=2)),
    "mixtral": ("mixtral", {}),
    "qwen2_moe": ("qwen2_moe", dict(norm_topk_prob=False, shared_expert_intermediate_size=48)),
}
EXPERT_KEY = {"qwen3_moe": "model.layers.1.mlp.experts.3.up_proj.weight",
              "mixtral": "model.layers.1.block_sparse_moe.experts.3.w3.weight",
              "qwen2_moe": "model.layers.1.mlp.experts.3.up_proj.weight"}


def hf_moe_model(family: str, **fields):
    """tests/test_model_families.py's small random model of ``family`` (every weight far from its init, the router
    and experts too), in fp32, with 4 experts, top 2."""
    experts = dict(num_local_experts=4) if family == "mixtral" else dict(num_experts=4, moe_intermediate_size=32)
    return hf_model(family, dtype=torch.float32, num_experts_per_tok=2, **experts, **fields)


IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        out = model(IDS)
    return (out.logits if hasattr(out, "logits") else out).double()


@pytest.mark.parametrize("name", CASES)
def test_a_moe_folder_reads_and_writes_with_transformers_logits(tmp_path, name):
    family, fields = CASES[name]
    hf = hf_moe_model(family, **fields)
    hf.save_pretrained(tmp_path / "hf")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert EXPERT_KEY[family] in f.keys()  # the layout read here is the one transformers writes
    expected = logits(hf)
    direct = evo.load_model(tmp_path / "hf")
    assert len(evo.model.moe.moe_blocks(direct)) == (1 if "sparse-step" in name else 2)
    assert (logits(direct) - expected).abs().max() <= TOL
    ckpt = from_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert (logits(evo.load_model(ckpt)) - expected).abs().max() <= TOL
    to_hf(ckpt, tmp_path / "back")
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["model_type"] == family
    with safe_open(str(tmp_path / "back" / "model.safetensors"), "pt") as f:
        assert EXPERT_KEY[family] in f.keys()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    assert type(back) is type(hf)
    assert (logits(back) - expected).abs().max() <= TOL


def test_an_unsupported_moe_family_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "deepseek"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "deepseek_v3",
                                                    "architectures": ["DeepseekV3ForCausalLM"]}))
    with pytest.raises(CheckpointError, match="holds a 'deepseek_v3' model .* Qwen3-MoE, Mixtral, Qwen2-MoE"):
        evo.load_model(folder)
    result = run_script("scripts/convert.py", "from-hf", "--hf", str(folder), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "deepseek_v3" in result.stderr and not (tmp_path / "out").exists()


def test_a_model_transformers_cannot_compute_is_not_written(tmp_path):
    """GShard drops tokens: no transformers family computes that, so to-hf refuses rather than write another
    model."""
    from evo.config import model_config
    from evo.model.hf import hf_family

    section = dict(num_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=8, num_experts=4, top_k=2,
                   moe_type="GShard")
    with pytest.raises(ValueError, match="drop no token"):
        hf_family(model_config(section))
    assert hf_family(model_config({**section, "moe_type": "Dropless"})) == "mixtral"
    assert hf_family(model_config({**section, "moe_type": "Dropless", "qk_norm": True})) == "qwen3_moe"


def mixtral_folder(folder):
    """A Mixtral folder with tests/parallel/layouts.py's MoE shapes (configs/tiny.py's model, 8 experts of width 64,
    top 2) and random weights, in two safetensors files."""
    config = transformers.MixtralConfig(vocab_size=258, hidden_size=256, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                        max_position_embeddings=2048, rope_theta=10000.0, num_local_experts=8,
                                        num_experts_per_tok=2, tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # smaller than test_hf_start's 0.3: through 4 MoE layers of those, tensor parallelism's other summation order
    # (1e-7) grows about 5-fold a layer, to 1e-4 of the last attention output
    randomize(model, 0.1)
    model.save_pretrained(folder, max_shard_size="8MB")
    return folder


@pytest.mark.slow  # about 40 s on the 2-core machine; .ci/run runs it after `make test`
def test_training_starts_from_a_mixtral_folder_in_any_layout(tmp_path):
    """ckpt_type="hf" into one process and into pp=2, msp and isp with a weight group (each rank reading its part of
    the stacked experts): every layout trains as the one process does (tests/parallel/test_hf_start.py's method)."""
    from tests.dist import run_distributed
    from tests.parallel.layouts import assert_same_training, merged
    from tests.parallel.test_hf_start import STEPS, start_from

    hf_dir = mixtral_folder(tmp_path / "hf")
    assert (hf_dir / "model.safetensors.index.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 258, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs, ours = hf(ids).logits.double(), evo.load_model(hf_dir)(ids).double()
    assert float((ours - theirs).abs().max()) <= 1e-3 * float(theirs.abs().max())
    (one,) = start_from(0, 1, str(tmp_path / "one"), [(str(hf_dir), "hf", dict(moe="Dropless"))])
    layouts = [dict(pp=2, moe="Dropless"), dict(tp=2, mode="msp", moe="Dropless"),
               dict(tp=2, mode="isp", weight=2, moe="Dropless")]
    ranks = run_distributed(start_from, 2, str(tmp_path / "two"), [(str(hf_dir), "hf", lay) for lay in layouts])
    for i, layout in enumerate(layouts):
        assert_same_training(merged(ranks, i), one, str(layout), STEPS, 1)


@pytest.mark.slow  # two command-line runs, about 8 s (make test stays under 10 minutes)
def test_upcycle_turns_a_dense_checkpoint_into_experts_that_compute_the_same(tmp_path):
    """Every expert a copy of its layer's MLP and the top-k weights normalised: the MoE model's logits are the
    dense model's; the router is drawn small and seeded; a MoE checkpoint is refused as input, in one line."""
    from evo.model.moe import moe_blocks

    hf = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64), dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path / "hf")
    dense = from_hf(tmp_path / "hf", tmp_path / "dense")
    result = run_script("scripts/convert.py", "upcycle", "--ckpt", str(dense), "--out", str(tmp_path / "moe"),
                        "--num-experts", "4", "--top-k", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    moe = evo.load_model(tmp_path / "moe")
    blocks = moe_blocks(moe)
    assert len(blocks) == 2 and blocks[0].num_experts == 4 and blocks[0].top_k == 2
    mlp = evo.load_model(dense).layers[1].feed_forward.w2.weight
    assert all(torch.equal(e, mlp) for e in blocks[1].experts.w2)
    assert 0 < blocks[0].gate.weight.std() < 0.05
    assert (logits(moe) - logits(evo.load_model(dense))).abs().max() <= 1e-5
    again = run_script("scripts/convert.py", "upcycle", "--ckpt", str(tmp_path / "moe"), "--out",
                       str(tmp_path / "twice"), "--num-experts", "4", "--top-k", "2")
    assert again.returncode == 2 and "holds a MoE model already" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1 and not (tmp_path / "twice").exists()
