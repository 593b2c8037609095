"""Reading a checkpoint never runs code from it (issue 24): train_state.pt is read with ``weights_only=True``,
DCP's ``.metadata`` with an unpickler that admits only DCP's own types, and a model key held as bytes (which DCP
would unpickle) is refused. Each case: a checkpoint whose reading would create a marker file is refused on resume
(one line, exit 2), by ``evo.load_model`` and by ``to-hf``, and no marker appears."""

import io
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from evo.errors import CheckpointError
from tests.helpers import run_script

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "evo_checkpoint"


class Payload:
    """Unpickled, it creates ``marker``: what a hostile pickle could do instead."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def checkpoint_with(tmp_path: Path, case: str, marker: Path) -> Path:
    """A copy of the fixture checkpoint (in a save folder, as step 2) whose ``case`` part would run code."""
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "checkpoints" / "2"
    shutil.copytree(FIXTURE / "checkpoint", folder)
    if case == "train_state":
        state = torch.load(folder / "train_state.pt", weights_only=False)  # the fixture's own, trusted
        state["scheduler"]["hook"] = Payload(marker)
        torch.save(state, folder / "train_state.pt")
    elif case == "metadata":
        meta = (folder / ".metadata").read_bytes()
        (folder / ".metadata").write_bytes(pickle.dumps([Payload(marker), meta]))
    else:  # a model tensor stored as bytes, which DCP unpickles with weights_only=False
        stored = dcp.FileSystemReader(str(FIXTURE / "checkpoint")).read_metadata().state_dict_metadata
        tensors = {key: torch.empty(tuple(m.size), dtype=m.properties.dtype) for key, m in stored.items()}
        dcp.load(tensors, checkpoint_id=str(FIXTURE / "checkpoint"))
        hostile = io.BytesIO()
        torch.save(Payload(marker), hostile)
        hostile.seek(0)
        tensors["model.tok_embeddings.weight"] = hostile
        for name in folder.iterdir():
            if name.name != "train_state.pt" and name.name != "config.json":
                name.unlink()
        dcp.save(tensors, checkpoint_id=str(folder))
    return folder


@pytest.mark.parametrize("case", ["train_state", "metadata", "bytes"])
def test_a_checkpoint_that_would_run_code_is_refused_in_process(tmp_path, case):
    """evo.load_model and evo.convert.to_hf in this process (make test); the command lines below (slow)."""
    from evo import load_model
    from evo.convert import to_hf

    marker = tmp_path / "marker"
    folder = checkpoint_with(tmp_path, case, marker)
    for call in (lambda: load_model(folder), lambda: to_hf(folder.parent, tmp_path / "hf")):
        with pytest.raises(CheckpointError, match="refused"):
            call()
    assert not marker.exists() and not (tmp_path / "hf").exists()


@pytest.mark.slow  # three command lines per case (about 6 s); the in-process test above runs in make test
@pytest.mark.parametrize("case", ["train_state", "metadata", "bytes"])
def test_a_checkpoint_that_would_run_code_is_refused_everywhere_and_nothing_runs(tmp_path, case):
    from evo import load_model

    marker = tmp_path / "marker"
    folder = checkpoint_with(tmp_path, case, marker)
    resumed = run_script("scripts/train.py", "--config", FIXTURE / "config.py", f"monitor.run_folder={tmp_path / 'run'}",
                         f"ckpt.save_ckpt_folder={folder.parent}", "data.total_steps=3")
    assert resumed.returncode == 2, resumed.stderr[-2000:]
    (line,) = resumed.stderr.strip().splitlines()[-1:]
    assert line.startswith("evo: error: ") and "refused" in line and "nothing from it has run" in line, line
    with pytest.raises(CheckpointError, match="refused"):
        load_model(folder)
    exported = run_script("scripts/convert.py", "to-hf", "--ckpt", folder, "--out", tmp_path / "hf")
    assert exported.returncode == 2 and "refused" in exported.stderr.strip().splitlines()[-1], exported.stderr[-2000:]
    assert not marker.exists()


def test_the_payload_does_run_when_read_unsafely(tmp_path):
    """The test's hostile pickles are real: plain pickle and torch.load(weights_only=False) run them."""
    marker = tmp_path / "marker"
    folder = checkpoint_with(tmp_path, "train_state", marker)
    torch.load(folder / "train_state.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    pickle.loads((checkpoint_with(tmp_path / "m", "metadata", marker) / ".metadata").read_bytes())
    assert marker.exists()


def test_a_checkpoint_of_today_still_loads(tmp_path):
    from evo import load_model

    model = load_model(FIXTURE / "checkpoint")
    assert model.cfg.num_layers == 1 and torch.isfinite(model.tok_embeddings.weight).all()


def test_metadata_names_a_python_313_path_and_nothing_else_gets_through():
    """Python 3.13 pickles PosixPath as pathlib._local.PosixPath: read as pathlib's on any Python; a name outside
    the list is refused before anything runs."""
    from evo.checkpoint import UnsafeCheckpointError, _MetadataUnpickler  # the unpickler under test

    path = _MetadataUnpickler(io.BytesIO(b"cpathlib._local\nPosixPath\n(S'/ckpt/.tmp-2'\ntR.")).load()
    assert path == Path("/ckpt/.tmp-2")
    with pytest.raises(UnsafeCheckpointError, match=r"^(io|builtins)\.open$"):
        _MetadataUnpickler(io.BytesIO(pickle.dumps(Payload(Path("/nowhere"))))).load()


def test_an_internevo_folder_whose_config_pickle_would_run_code_is_refused(tmp_path):
    """model_config.pt in torch's legacy (non-zip) format: torch reads its first pickles with pickle_module.load,
    which is evo's restricted unpickler too."""
    from evo.weights import open_folder

    marker = tmp_path / "marker"
    folder = tmp_path / "internevo"
    folder.mkdir()
    (folder / "model_tp0_pp0.pt").write_bytes(b"")
    (folder / "model_config.pt").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match="model_config.pt' cannot be read"):
        open_folder(folder)
    assert not marker.exists()
