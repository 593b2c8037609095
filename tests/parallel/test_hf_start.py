"""Training starts from a Hugging Face folder in any layout (``ckpt.load_ckpt_info`` with ``ckpt_type="hf"``):
each rank reads only its part of each tensor from the safetensors files, so every layout must train exactly as
one process started from the same folder does (which tests/test_convert.py checks against transformers). The
same weights saved as an InternEvo folder (tp=2, pp=2; ``ckpt_type="internevo"``) train the same way too."""

import math

import pytest
import torch
import transformers

from tests.dist import run_distributed
from tests.internevo_folder import write_folder
from tests.parallel.layouts import tiny_sections, train


def tiny_hf_folder(folder):
    """A Llama folder with configs/tiny.py's shapes and random weights (split over two safetensors files)."""
    config = transformers.LlamaConfig(vocab_size=258, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                      max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    model.save_pretrained(folder, max_shard_size="4MB")
    return folder


def start_from(rank, world_size, folder, runs):
    """The losses of three steps for each (source folder, ckpt_type, layout) of ``runs``."""
    from pathlib import Path

    out = []
    for i, (source, kind, layout) in enumerate(runs):
        sections = tiny_sections(Path(folder) / f"layout{i}", **layout)
        sections["data"].update(total_steps=3, valid_every=0)
        sections["ckpt"] = dict(enable_save_ckpt=False, load_ckpt_info=dict(path=source, content=("model",),
                                                                            ckpt_type=kind))
        out.append(train(rank, world_size, sections).get("loss"))
    return out


@pytest.mark.slow  # over 15 s on the 2-core machine; .ci/run runs it after `make test`
def test_training_starts_from_a_hugging_face_or_internevo_folder_in_any_layout(tmp_path):
    hf_dir = tiny_hf_folder(tmp_path / "hf")
    assert (hf_dir / "model.safetensors.index.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    internevo = str(write_folder(tmp_path / "internevo", hf.state_dict(), hf.config, tp=2, pp=2))
    hf_dir = str(hf_dir)
    one, one_internevo = start_from(0, 1, str(tmp_path / "one"), [(hf_dir, "hf", {}), (internevo, "internevo", {})])
    layouts = [dict(pp=2), dict(tp=2, mode="msp"), dict(tp=2, mode="isp", weight=2)]
    runs = [(hf_dir, "hf", layout) for layout in layouts] + [(internevo, "internevo", layouts[0]),
                                                             (internevo, "internevo", layouts[2])]
    losses = run_distributed(start_from, 2, str(tmp_path / "two"), runs)[0]
    assert len(one) == 3 and one[0] < 10  # random weights of std 0.05 over 258 tokens: about ln(258) = 5.6
    assert one_internevo == one
    for run, run_losses in zip(runs, losses):
        assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(run_losses, one)), (run, run_losses, one)
