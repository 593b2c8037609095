"""InternEvo's own checkpoint folders (evo/internevo.py): a folder written as InternEvo lays one out
(tests/internevo_folder.py, from transformers' Llama weights) under tensor, pipeline, isp and chunked layouts, read
into evo's model, gives transformers' logits; what evo cannot read is one line."""

import copy
import pickle

import pytest
import torch

from tests.internevo_folder import save_model_section, write_folder
from tests.test_convert import IDS, TOL, logits
from tests.test_model_families import hf_model
from evo.checkpoint import CorruptCheckpointError
from evo.config import config_from_dict
from evo.errors import CheckpointError
from evo.internevo import load_internevo_weights
from evo.model import build_model
from evo.model.hf import model_config_from_hf


def evo_model(hf, **override):
    fields = dict(model_config_from_hf(hf.config), dtype="torch.float32", **override)
    return build_model(config_from_dict({"model": fields}).model, "cpu", seed=1).eval()


@pytest.fixture(scope="module")
def llama():
    return hf_model("llama", dtype=torch.float32, num_hidden_layers=4, attention_bias=True)


LAYOUTS = {  # name: (write_folder's layout, evo's model fields)
    "internlm2 tp2 pp2": (dict(tp=2, pp=2, adapt_hf=True), {}),
    "internlm2 isp wp2, pairs": (dict(wp=2, adapt_hf=False), {}),
    "llama isp wp4 pp2, keys under model.": (dict(wp=4, pp=2, internlm2=False, wrapped=True), {}),
    "internlm2 isp before 2024-07, tp4 wp2": (dict(tp=4, wp=2, early=True), {}),
    "llama isp before 2024-07, tp2 wp4 pp2": (dict(tp=2, wp=4, pp=2, early=True, internlm2=False), {}),
    "llama pp3 (1+1+2 layers), pairs by default": (dict(pp=3, internlm2=False), {}),
    "llama tp2 pp2 two chunks, vocab-split embedding": (dict(tp=2, pp=2, chunks=2, internlm2=False, adapt_hf=True,
                                                            vocab_split=True), {}),
    "internlm2 isp wp2 pp2 ZBV": (dict(wp=2, pp=2, chunks=2, schedule="ZBV"), {}),
    "internlm2 tp2 pp2 ZBV": (dict(tp=2, pp=2, chunks=2, schedule="ZBV"), {}),
    "internlm2 tp2 into evo's pairs layout": (dict(tp=2, adapt_hf=True), dict(qk_interleaved=True)),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_an_internevo_folder_gives_transformers_logits(tmp_path, llama, name):
    layout, fields = LAYOUTS[name]
    folder = write_folder(tmp_path / "ckpt", llama.state_dict(), llama.config, **layout)
    model = evo_model(llama, **fields)
    before = (logits(model, IDS) - logits(llama, IDS)).abs().max()
    load_internevo_weights(model, folder)
    assert before > 1.0  # evo's own random weights are far off; the loaded ones are not
    assert (logits(model, IDS) - logits(llama, IDS)).abs().max() <= TOL


def test_what_cannot_be_read_is_one_line(tmp_path, llama):
    state, config = llama.state_dict(), llama.config
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"is not an InternEvo checkpoint folder: it has no model_tp\*_pp\*.pt "
                                              r"\(nor model_wp\*_pp\*.pt\) files"):
        load_internevo_weights(evo_model(llama), tmp_path / "empty")

    folder = write_folder(tmp_path / "a", state, config, tp=2, pp=2)
    (folder / "model_tp1_pp1.pt").unlink()
    with pytest.raises(CheckpointError, match=r"is incomplete: pipeline rank 1 lacks some of tp 0\.\.1 files"):
        load_internevo_weights(evo_model(llama), folder)

    folder = write_folder(tmp_path / "a2", state, config, wp=2, pp=2)
    (folder / "model_wp1_pp0.pt").unlink()
    with pytest.raises(CheckpointError, match=r"is incomplete: pipeline rank 0 lacks some of wp 0\.\.1 files"):
        load_internevo_weights(evo_model(llama), folder)
    write_folder(folder, state, config, tp=2, pp=2)  # another save's files beside these
    with pytest.raises(CheckpointError, match=r"mixes model files of different layouts \(model_tp1_pp1.pt, "
                                              r"model_wp1_pp1.pt\)"):
        load_internevo_weights(evo_model(llama), folder)

    folder = write_folder(tmp_path / "b", state, config, tp=2)
    (folder / "model_tp0_pp0.pt").rename(folder / "model_tp0_pp0_dp0.pt")
    with pytest.raises(CheckpointError, match="was saved with FSDP"):
        load_internevo_weights(evo_model(llama), folder)
    (tmp_path / "dcp").mkdir()
    (tmp_path / "dcp" / ".metadata").write_bytes(b"")  # InternEvo's FSDP saves with DCP today, beside the
    save_model_section(tmp_path / "dcp" / "model_config.pt", dict(num_layers=4))  # manager's model_config.pt
    with pytest.raises(CheckpointError, match=r"was saved with FSDP \(DCP files\)"):
        load_internevo_weights(evo_model(llama), tmp_path / "dcp")

    folder = write_folder(tmp_path / "c", state, config, tp=2)
    with pytest.raises(CheckpointError, match="it holds 4 layers and model.num_layers is 2"):
        load_internevo_weights(evo_model(llama, num_layers=2), folder)
    with pytest.raises(CheckpointError, match=r"does not fit this model: 'layers.0.feed_forward.w1.weight' is "
                                              r"\(96, 64\) there and \(128, 64\) here"):
        load_internevo_weights(evo_model(llama, intermediate_size=128), folder)
    data = (folder / "model_tp1_pp0.pt").read_bytes()
    (folder / "model_tp1_pp0.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match=r"model_tp1_pp0.pt' cannot be read \(truncated or corrupt\?\)"):
        load_internevo_weights(evo_model(llama), folder)


def test_zbv_stages_are_told_from_interleaved_ones_by_the_saved_config(tmp_path, llama):
    """Under ZBV the second chunk runs down the ranks: with equal stage sizes only the saved config text tells the
    folder from an interleaved one (read as interleaved, its layers would load permuted). Without the text, stage
    sizes that differ between the two decide; sizes that do not are refused on one line."""
    state, config = llama.state_dict(), llama.config
    folder = write_folder(tmp_path / "zbv", state, config, pp=2, chunks=2, schedule="ZBV", config_file=False)
    with pytest.raises(CheckpointError, match=r"neither its config_file.pt \(absent, or not stating "
                                              r"parallel.pipeline.mode as a literal\) nor the stage sizes say"):
        load_internevo_weights(evo_model(llama), folder)
    (folder / "config_file.pt").write_bytes(b"not a torch file")
    with pytest.raises(CorruptCheckpointError, match=r"config_file.pt' cannot be read as InternEvo's saved config"):
        load_internevo_weights(evo_model(llama), folder)
    texts = {  # the ways a config names its pipeline mode
        "ZBV": 'MODE = "ZBV"\nparallel = dict(pipeline=dict(size=2, mode=MODE))\n',
        "zbv": 'parallel = {"pipeline": {"size": 2, "mode": "zbv"}}\n',
        "1F1B": "parallel = dict(pipeline=dict(size=2))\n",
    }
    for mode, text in texts.items():
        torch.save(text, folder / "config_file.pt")
        model = evo_model(llama)
        load_internevo_weights(model, folder)
        error = (logits(model, IDS) - logits(llama, IDS)).abs().max()
        assert (error <= TOL) == (mode != "1F1B"), (mode, error)  # read as interleaved: layers permuted
    for text in ('BASE = dict(size=2, mode="ZBV")\nparallel = dict(pipeline=dict(**BASE))\n',  # not stated plainly
                 'from base import *\nparallel = dict(pipeline=dict(size=2))\n',  # names from elsewhere
                 'parallel = dict(pipeline=dict(size=2))\nparallel["pipeline"] = dict(size=2, mode="ZBV")\n',
                 'parallel = dict(tensor=dict(size=2))\n',  # no pipeline: not this pipelined folder's config
                 b'parallel = dict(pipeline=dict(size=2))'):  # bytes, not text
        torch.save(text, folder / "config_file.pt")
        error = CorruptCheckpointError if isinstance(text, bytes) else CheckpointError
        match = "holds a bytes, not the config file's text" if isinstance(text, bytes) else "nor the stage sizes say"
        with pytest.raises(error, match=match):
            load_internevo_weights(evo_model(llama), folder)
    six = hf_model("llama", dtype=torch.float32, num_hidden_layers=6)  # chunk of 3: stages of 1 and 2 layers
    for schedule in ("ZBV", "1F1B"):
        folder = write_folder(tmp_path / f"six-{schedule}", six.state_dict(), six.config, pp=2, chunks=2,
                              schedule=schedule, config_file=False)
        model = evo_model(six)
        load_internevo_weights(model, folder)
        assert (logits(model, IDS) - logits(six, IDS)).abs().max() <= TOL, schedule
    torch.save("parallel = dict(pipeline=dict(size=2))\n", folder / "config_file.pt")  # 1F1B, as written
    load_internevo_weights(evo_model(six), folder)
    torch.save('parallel = dict(pipeline=dict(size=2, mode="ZBV"))\n', folder / "config_file.pt")
    with pytest.raises(CheckpointError, match="config_file.pt says pipeline mode 'ZBV', and its stage sizes are "
                                              "those of the other schedule"):
        load_internevo_weights(evo_model(six), folder)
    (folder / "model_tp0_pp1.pt").rename(folder / "model_tp0_pp2.pt")  # three stages' sizes from two
    write_folder(tmp_path / "pp1", six.state_dict(), six.config, chunks=2)
    (tmp_path / "pp1" / "model_tp0_pp0.pt").rename(folder / "model_tp0_pp1.pt")
    with pytest.raises(CheckpointError, match=r"holds stages of .* layers per \(chunk, pipeline rank\), which "
                                              "InternEvo's partition_uniform gives to neither"):
        load_internevo_weights(evo_model(six, num_layers=12), folder)


class Boom:
    def __reduce__(self):
        return (print, ("a pickle ran code",))


def test_the_model_section_is_read_without_running_code(tmp_path, llama):
    folder = write_folder(tmp_path / "ckpt", llama.state_dict(), llama.config, adapt_hf=False)
    model = evo_model(llama)
    load_internevo_weights(model, folder)  # InternEvo's Config class and a torch dtype inside are fine
    assert (logits(model, IDS) - logits(llama, IDS)).abs().max() <= TOL
    save_model_section(folder / "model_config.pt", dict(adapt_hf=False, payload=Boom()))
    with pytest.raises(CorruptCheckpointError, match=r"model_config.pt' cannot be read: .*builtins.print' is not "
                                                     r"expected in a model section"):
        load_internevo_weights(model, folder)
    assert pickle.loads(pickle.dumps(Boom())) is None  # the payload does run code when unpickled plainly


def test_load_model_builds_the_model_from_the_saved_section(tmp_path, llama):
    """``evo.load_model`` (and so ``scripts/generate.py --ckpt``) reads the model section InternEvo saved
    (``model_config.pt``, InternEvo's field names and a torch dtype; no_bias left to InternEvo's default, False,
    which gives q, k, v and o biases and no MLP bias): the pairs layout of ``adapt_hf=False`` gives a model in that
    layout, with transformers' logits."""
    import evo

    c = llama.config
    section = dict(num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
                   num_kv_attention_heads=c.num_key_value_heads, vocab_size=c.vocab_size, mlp_ratio=1.5,
                   multiple_of=32, layer_norm_epsilon=c.rms_norm_eps, rope_base=c.rope_parameters["rope_theta"],
                   dtype=torch.bfloat16, checkpoint=True, num_chunks=2,
                   embed_split_hidden=True, use_flash_attn=True, adapt_hf=False)
    folder = write_folder(tmp_path / "ckpt", llama.state_dict(), c, tp=2, pp=2, chunks=2, adapt_hf=False)
    save_model_section(folder / "model_config.pt", section)
    model = evo.load_model(folder, dtype=torch.float32)
    assert model.cfg.qk_interleaved and model.cfg.intermediate_size == c.intermediate_size
    assert (logits(model, IDS) - logits(llama, IDS)).abs().max() <= TOL
    assert evo.load_model(folder).cfg.torch_dtype == torch.bfloat16
    (folder / "model_config.pt").unlink()
    with pytest.raises(CheckpointError, match="has no model_config.pt to build the model from"):
        evo.load_model(folder)


def test_a_normalized_head_and_tensors_the_model_has_no_place_for(tmp_path, llama):
    """``norm_head``: InternEvo saves the head raw and normalises its rows in forward, so they load normalised.
    A folder with biases the model lacks is refused rather than read in part."""
    folder = write_folder(tmp_path / "ckpt", llama.state_dict(), llama.config, tp=2)
    save_model_section(folder / "model_config.pt", dict(norm_head=True))
    model = evo_model(llama)
    load_internevo_weights(model, folder)
    expected = copy.deepcopy(llama)
    with torch.no_grad():
        head = expected.lm_head.weight
        head.copy_(head / head.norm(dim=1, keepdim=True))
    assert (logits(model, IDS) - logits(expected, IDS)).abs().max() <= TOL
    assert (logits(model, IDS) - logits(llama, IDS)).abs().max() > 0.1
    with pytest.raises(CheckpointError, match=r"holds 'layers.0.attention.wo.bias', 'layers.0.attention.wqkv.bias', "
                                              r"'layers.1.attention.wo.bias' and more, which this model has no place "
                                              r"for \(check model.no_bias"):
        load_internevo_weights(evo_model(llama, qkv_bias=False, o_bias=False), folder)


def test_to_hf_writes_an_internevo_folder_for_transformers(tmp_path, llama):
    """``scripts/convert.py to-hf --ckpt INTERNEVO_FOLDER``: the pairs-layout weights of a chunked isp folder come
    out in transformers' halves layout, and ``from_pretrained`` gives the original logits."""
    import transformers

    from tests.helpers import run_script

    c = llama.config
    folder = write_folder(tmp_path / "ckpt", llama.state_dict(), c, tp=2, wp=2, pp=2, chunks=2, internlm2=False)
    save_model_section(folder / "model_config.pt", dict(
        num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
        num_kv_attention_heads=c.num_key_value_heads, vocab_size=c.vocab_size, mlp_ratio=1.5, multiple_of=32,
        layer_norm_epsilon=c.rms_norm_eps, rope_base=c.rope_parameters["rope_theta"], dtype=torch.float32))
    result = run_script("scripts/convert.py", "to-hf", "--ckpt", str(folder), "--out", str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert (logits(hf, IDS) - logits(llama, IDS)).abs().max() <= TOL
