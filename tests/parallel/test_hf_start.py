"""Training starts from a Hugging Face folder in any layout (``ckpt.load_ckpt_info`` with ``ckpt_type="hf"``):
each rank reads only its part of each tensor from the safetensors files, so every layout must train exactly as
one process started from the same folder does, and that one process must compute what transformers computes
from the folder. The same weights saved as InternEvo folders (tp=2 x pp=2, and isp wp=2 x pp=2 with ZBV's two chunks;
``ckpt_type="internevo"``) train the same way too.

The weights are of a scale where every tensor moves the loss (std 0.3, norm weights near 1: attention far from
uniform), and layouts are compared as tests/parallel/layouts.py's ``assert_same_training`` does, by every
step's loss and gradient norm and every final weight: a shard read from the wrong place (two k heads swapped,
the halves of o_proj) changes the weights the run ends with, whatever it does to the loss."""

import pytest
import torch
import transformers

from tests.dist import run_distributed
from tests.internevo_folder import write_folder
from tests.parallel.layouts import assert_same_training, merged, tiny_sections, train

STEPS = 2
LR = 1e-5


def tiny_hf_folder(folder):
    """A Llama folder with configs/tiny.py's shapes and random weights (split over two safetensors files)."""
    config = transformers.LlamaConfig(vocab_size=258, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                      max_position_embeddings=2048, tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model, 0.3)
    model.save_pretrained(folder, max_shard_size="4MB")
    return folder


@torch.no_grad()
def randomize(model, std: float) -> None:
    """Weights of a scale where every tensor moves the loss (seeded): norms near 1, the head smaller (logits of std
    about 1, where the loss is no plateau), every other tensor of ``std``."""
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.uniform_(0.8, 1.2)
        else:
            p.normal_(0.0, 0.05 if name == "lm_head.weight" else std)


def start_from(rank, world_size, folder, runs):
    """What rank 0 reports (tests/parallel/layouts.py's ``train``) of ``STEPS`` steps and an evaluation, for each
    (source folder, ckpt_type, layout) of ``runs``."""
    from pathlib import Path

    out = []
    for i, (source, kind, layout) in enumerate(runs):
        sections = tiny_sections(Path(folder) / f"layout{i}", **layout)
        sections["data"].update(total_steps=STEPS, valid_every=STEPS)
        sections["adam"]["lr"] = LR
        sections["ckpt"] = dict(enable_save_ckpt=False, load_ckpt_info=dict(path=source, content=("model",),
                                                                            ckpt_type=kind))
        out.append(train(rank, world_size, sections))
    return out


def logits_from_the_folder(folder, ids):
    """(evo's, transformers') logits of ``ids`` from the Hugging Face folder, one process, fp32."""
    import evo

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = evo.load_model(folder)
    with torch.no_grad():
        return model(ids).double(), hf(ids).logits.double()


@pytest.mark.slow  # about 40 s on the 2-core machine; .ci/run runs it after `make test`
def test_training_starts_from_a_hugging_face_or_internevo_folder_in_any_layout(tmp_path):
    hf_dir = tiny_hf_folder(tmp_path / "hf")
    assert (hf_dir / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 258, (2, 48), generator=torch.Generator().manual_seed(2))
    ours, theirs = logits_from_the_folder(hf_dir, ids)
    assert theirs.std() > 0.5  # attention far from uniform and logits that matter: every tensor shows in them
    error = float((ours - theirs).abs().max())
    assert error <= 1e-3 * float(theirs.abs().max()), f"evo's logits from the folder are {error:.3g} off transformers'"
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    internevo = str(write_folder(tmp_path / "internevo", hf.state_dict(), hf.config, tp=2, pp=2))
    # InternEvo's isp with two ZBV chunks: the embedding and head split over wp, rank 0 the first and last layers
    zbv = str(write_folder(tmp_path / "zbv", hf.state_dict(), hf.config, wp=2, pp=2, chunks=2, schedule="ZBV"))
    hf_dir = str(hf_dir)
    one, *others = start_from(0, 1, str(tmp_path / "one"), [(hf_dir, "hf", {}), (internevo, "internevo", {}),
                                                            (zbv, "internevo", {})])
    for other in others:
        assert_same_training(other, one, "one process from an InternEvo folder", STEPS, 1)
    layouts = [dict(pp=2), dict(tp=2, mode="msp"), dict(tp=2, mode="isp", weight=2)]
    runs = [(hf_dir, "hf", layout) for layout in layouts] + [(internevo, "internevo", layouts[0]),
                                                             (internevo, "internevo", layouts[2]),
                                                             (zbv, "internevo", dict(pp=2, schedule="ZBV", chunks=2))]
    ranks = run_distributed(start_from, 2, str(tmp_path / "two"), runs)
    for i, run in enumerate(runs):
        assert_same_training(merged(ranks, i), one, str(run), STEPS, 1)
