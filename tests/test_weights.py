"""evo/weights.py: what a folder of weights is, and the model config it holds (loading is tested per kind in
tests/test_convert.py, tests/test_internevo*.py and tests/test_train_script.py)."""

import json
import shutil
from pathlib import Path

import pytest

from evo.errors import CheckpointError
from evo.weights import folder_kind, open_folder

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_each_kind_of_folder_is_told_apart_and_opened(tmp_path):
    checkpoint = FIXTURES / "evo_checkpoint" / "checkpoint"
    runs = tmp_path / "checkpoints"  # a folder of checkpoints means its newest
    shutil.copytree(checkpoint, runs / "2")
    shutil.copytree(checkpoint, runs / "10")
    assert folder_kind(checkpoint) == folder_kind(runs) == "evo"
    folder = open_folder(runs)
    assert folder.path == runs / "10" and folder.model.num_layers == 1 and folder.model.hidden_size == 32

    internevo = FIXTURES / "internevo" / "isp_zbv"
    assert folder_kind(internevo) == "internevo"
    assert open_folder(internevo).kind == "internevo"

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                                "num_hidden_layers": 2, "num_attention_heads": 4,
                                                "num_key_value_heads": 2, "vocab_size": 100, "rms_norm_eps": 1e-6,
                                                "rope_theta": 10000.0, "max_position_embeddings": 256}))
    (hf / "tokenizer.json").write_text("{}")
    assert folder_kind(hf) == "hf"
    folder = open_folder(hf)
    assert (folder.model.num_layers, folder.model.kv_heads, folder.tokenizer_path) == (2, 2, str(hf / "tokenizer.json"))


def test_a_folder_of_no_kind_is_refused_with_one_line(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")  # neither a transformers config nor an evo checkpoint
    assert folder_kind(broken) == "evo"
    with pytest.raises(CheckpointError, match=r"is neither an evo checkpoint nor a folder holding one$"):
        open_folder(broken)
    with pytest.raises(CheckpointError, match=r"does not exist$"):
        open_folder(tmp_path / "missing")
