import os
import tempfile
from pathlib import Path

import pytest

if "TRITON_INTERPRET" not in os.environ:
    import torch.cuda

    # Triton kernels run through the interpreter on machines without a GPU (set before triton is imported)
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_configure(config):
    # tokenizers trained by tests go to a fresh folder, never to the user's ~/.cache/evo
    os.environ["EVO_CACHE_DIR"] = tempfile.mkdtemp(prefix="evo-test-cache-")


@pytest.fixture
def config_file(tmp_path):
    """Write a config file from Python source text; returns its path."""

    def write(text: str, name: str = "cfg.py") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write
