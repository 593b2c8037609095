import pytest
import torch

from tests.kernels.oracle import DEVICE


@pytest.fixture(autouse=True)
def _kernel_device():
    """Kernel tests build their tensors on the default device: the GPU where there is one, else the CPU
    (where the Triton kernels run through the interpreter)."""
    previous = torch.get_default_device()
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device(previous)
