"""The kernel oracle (flash-attention's test criterion), written once.

Against an fp32 (or fp64) reference ``exact``, the kernel's error is bounded by that of the plain PyTorch
implementation run in the input dtype (``same_dtype``):
- max abs error <= ``factor`` x torch's max abs error + a floor: factor 2 for outputs, 3 for gradients
  (flash-attn's), floor 1e-5 (fp32), 1e-3 (fp16), 1e-2 (bf16);
- mean abs error <= 2 x torch's mean abs error + 1e-4. The max bound alone is loose where its bf16 floor
  (1e-2) dominates: a bf16 decode kernel that drops the newest of ~900 cached keys stays at 0.81 of the max
  bound, but at 2.4x the mean bound (test_kvcache.py::test_decode_step_long_cache_bf16).
Both bounds hold unwidened under Triton's interpreter too, although its bf16 stores round toward zero (PyTorch
rounds to nearest), which doubles the mean rounding error of a bf16 result: measured over every kernel test, the
kernels' mean errors stay within 0.71 of the mean bound, their max errors within 0.64 of the max bound. Should a
bound ever need widening for that, widen it under the interpreter only, with a comment, keeping flash-attn's
bounds for GPU runs: bf16 RMSNorm's max bound takes one ulp (``max_slack``, tests/kernels/interpreter_bf16.py).
"""

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
MEAN_FACTOR = 2
MEAN_FLOOR = 1e-4


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def mean_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().mean().item() if a.numel() else 0.0


def assert_oracle(name: str, kernel: torch.Tensor, same_dtype: torch.Tensor, exact: torch.Tensor, dtype,
                  grad: bool = False, max_slack: float = 0.0) -> None:
    """``max_slack``: added to the max bound only (tests/kernels/interpreter_bf16.py: the interpreter's rounding)."""
    assert kernel.shape == exact.shape, (name, kernel.shape, exact.shape)
    assert torch.isfinite(kernel).all(), f"{name}: non-finite values"
    torch_max = max_err(same_dtype, exact)
    bound = (3 if grad else 2) * torch_max + FLOOR[dtype] + max_slack
    err = max_err(kernel, exact)
    assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g} (torch {dtype} error {torch_max:.3g})"
    torch_mean = mean_err(same_dtype, exact)
    mean_bound = MEAN_FACTOR * torch_mean + MEAN_FLOOR
    err = mean_err(kernel, exact)
    assert err <= mean_bound, (f"{name}: mean error {err:.3g} > bound {mean_bound:.3g} (torch {dtype} mean error "
                               f"{torch_mean:.3g})")


def run_with_grads(fn, inputs, grad_out_seed=0):
    """Run fn(*inputs) (leaf copies requiring grad for float inputs), backprop a fixed random cotangent;
    returns (outputs tuple, grads tuple)."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if torch.is_tensor(t) else t for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(grad_out_seed)
    cots = [torch.randn(o.shape, generator=gen, device="cpu").to(o.device, o.dtype) for o in outs]
    torch.autograd.backward(outs, cots)
    grads = tuple(t.grad for t in leaves if torch.is_tensor(t) and t.requires_grad)
    return tuple(o.detach() for o in outs), grads
