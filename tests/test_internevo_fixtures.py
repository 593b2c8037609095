"""Checkpoint folders written by InternEvo itself (tests/fixtures/internevo/, made by its own
``save_model_checkpoint`` on CPU: make_fixtures.py there says how), read by evo: every tensor comes back whole
and equal to the values each rank was filled with, the stage order of a ZBV pipeline included.

tests/internevo_folder.py writes folders from what InternEvo's code says; these are what its code does:

- ``isp_zbv``: isp with tensor 2 and weight 2 over two ZBV pipeline stages, two chunks (``model_wp{w}_pp{p}.pt``;
  rank 0 holds layers 0 and 3, the embedding, the final norm and the head);
- ``mtp_interleaved``: tensor 2, two interleaved pipeline stages of two chunks (``model_tp{t}_pp{p}.pt``);
- ``isp_tp4_wp2``: isp with tensor 4 and weight 2: the embedding and head split over the two weight ranks, not
  the four tensor ranks.
"""

import json
import math
import zlib
from pathlib import Path

import pytest
import torch

from tests.test_convert import internlm2_pack
from evo.config import config_from_dict
from evo.internevo import internevo_tensors, model_section
from evo.model import build_model

FIXTURES = Path(__file__).parent / "fixtures" / "internevo"
LAYOUTS = ["isp_zbv", "mtp_interleaved", "isp_tp4_wp2"]


def fixture_values(name: str, shape) -> torch.Tensor:
    """The whole tensor ``name`` of the fixtures' model: values in [-0.5, 0.5) from each element's position and a
    hash of the name, with no random generator, so that any torch version gives them alike."""
    position = torch.arange(math.prod(shape), dtype=torch.int64)
    x = (position * 2654435761 + zlib.crc32(name.encode())) % 1000003
    return (x.double() / 1000003 - 0.5).float().reshape(shape)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_folder_internevo_wrote_reads_back_whole(layout):
    folder = FIXTURES / layout
    record = json.loads((folder / "fixture.json").read_text())
    assert record["made_by"].startswith("InternEvo 58f723a save_model_checkpoint")
    section = model_section(folder)  # InternEvo's pickled Config, read without running code
    assert section["num_layers"] == 4 and section["dtype"] == "torch.float32"
    cfg = config_from_dict({"model": section}).model
    names = [name for name, _ in build_model(cfg, "meta").named_parameters()]
    read: dict[str, dict[str, torch.Tensor]] = {}  # the folder's name -> {evo's name: tensor}
    for name, key, tensor in internevo_tensors(folder, cfg, names):
        read.setdefault(key, {})[name] = tensor
    assert sorted(read) == sorted(record["shapes"])  # every tensor InternEvo's model has, none twice
    for key, parts in read.items():
        if key.endswith(".wqkv.weight"):  # InternLM2's packing, put back here apart from evo's unpacking
            module = key.rsplit(".", 2)[0]
            tensor = internlm2_pack(*(parts[f"{module}.{w}.weight"] for w in ("wq", "wk", "wv")), cfg.kv_heads)
        else:
            (tensor,) = parts.values()
        assert torch.equal(tensor, fixture_values(key, record["shapes"][key])), f"{layout}: {key}"


def test_the_zbv_folder_read_as_interleaved_would_permute_its_layers(tmp_path):
    """The ZBV folder's stage sizes are those of an interleaved one: only its saved config tells them apart."""
    import shutil

    from evo.errors import CheckpointError

    folder = shutil.copytree(FIXTURES / "isp_zbv", tmp_path / "zbv")
    text = torch.load(folder / "config_file.pt", weights_only=True)
    assert 'mode="ZBV"' in text
    cfg = config_from_dict({"model": model_section(folder)}).model
    (folder / "config_file.pt").unlink()
    with pytest.raises(CheckpointError, match="nor the stage sizes say whether the zero-bubble V schedule"):
        list(internevo_tensors(folder, cfg, ["layers.3.attention.wo.weight"]))
    torch.save(text.replace('mode="ZBV"', 'mode="1F1B"'), folder / "config_file.pt")
    (_, _, wo), = internevo_tensors(folder, cfg, ["layers.3.attention.wo.weight"])
    assert torch.equal(wo, fixture_values("layers.2.attention.wo.weight", list(wo.shape)))
