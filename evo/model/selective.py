"""What a checkpointed layer keeps besides its input (InternEvo's Selective Checkpoint++), and activations that wait
on the CPU (InternEvo's ``cpu_offloading``).

Full activation checkpointing runs a layer's forward again in backward, attention included: the quadratic part.
With ``selective_checkpoint`` a checkpointed layer keeps attention's output and log-sum-exp from the forward, and
its recomputation reads them instead of running attention again; attention's backward then runs from them
(``evo.kernels.flash_attn_varlen_backward``, or the context ring's under 2D sequence parallelism).

Mechanism: ``torch.utils.checkpoint`` (non-reentrant) takes a ``context_fn`` giving one context for the forward and
one for the recomputation; both make the layer's attention use the same ``KeptAttention`` slot. The forward runs
attention and stores (out, lse) in it; the recomputation finds them there and returns them, recording the same
saved tensors (q, k, v, out, lse) for the original graph's backward. Why not a selective checkpoint policy
(``create_selective_checkpoint_contexts``): in eager mode evo's Triton ops bypass the dispatcher
(``triton_utils.OpaqueOp``) and the reference attention is several aten ops, so a policy never sees one attention
op to save; a slot per checkpointed call is what InternEvo's AttnOffloadManager keeps too, and it works for both
backends and for the ring.

With ``selective_checkpoint_offload`` the slot's tensors wait on the CPU between forward and recomputation (pinned,
copied on a side stream on a GPU). ``OffloadedActivations`` (``cpu_offloading``) is a saved-tensor hook pair that
moves the activations a layer saves for backward to the CPU and back.
"""

from __future__ import annotations

import contextlib

import torch

from evo import kernels


class KeptAttention:
    """One checkpointed forward's attention (out, lse), kept from the forward for the recomputation. With
    ``offload`` they wait on the CPU: pinned and copied on ``stream`` (a CUDA side stream) on a GPU."""

    def __init__(self, offload: bool = False, stream=None):
        self.offload, self.stream = offload, stream
        self.out = self.lse = None
        self.device = self.ready = None
        self.offloaded_bytes = 0  # what went to the CPU (tests and the memory report read it)

    @property
    def filled(self) -> bool:
        return self.out is not None

    def keep(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        if not self.offload:
            self.out, self.lse = out, lse
            return
        self.device = out.device
        cuda = out.device.type == "cuda"
        self.out, self.lse = (torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=cuda) for t in (out, lse))
        if cuda:  # the copy runs beside the compute: the side stream waits for out and lse to be written
            self.stream.wait_stream(torch.cuda.current_stream(out.device))
            with torch.cuda.stream(self.stream):
                for src, dst in ((out, self.out), (lse, self.lse)):
                    dst.copy_(src, non_blocking=True)
                    src.record_stream(self.stream)  # not reused before the copy is done
                self.ready = torch.cuda.Event()
                self.ready.record(self.stream)
        else:
            self.out.copy_(out)
            self.lse.copy_(lse)
        self.offloaded_bytes = sum(t.numel() * t.element_size() for t in (out, lse))

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, lse) on the device they were computed on; the slot is emptied."""
        out, lse = self.out, self.lse
        self.out = self.lse = None
        if self.offload:
            if self.ready is not None:
                self.ready.synchronize()
            cuda = self.device.type == "cuda"
            out, lse = (t.to(self.device, non_blocking=cuda) for t in (out, lse))
        return out, lse


class _KeptAttention(torch.autograd.Function):
    """Varlen causal attention whose forward runs once per checkpointed call: the forward computes and keeps
    (out, lse); the recomputation returns them. Backward from them with ``flash_attn_varlen_backward``."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen: int, window: tuple[int, int], slot: KeptAttention):
        if slot.filled:  # the recomputation: attention is not run again
            out, lse = slot.take()
        else:
            out, lse, _ = kernels.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                                         causal=True, window_size=window, return_attn_probs=True)
            slot.keep(out, lse)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.max_seqlen, ctx.window = max_seqlen, window
        return out.detach()

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu = ctx.saved_tensors
        dq, dk, dv = kernels.flash_attn_varlen_backward(dout.contiguous(), q, k, v, out, lse, cu, cu, ctx.max_seqlen,
                                                        ctx.max_seqlen, causal=True, window_size=ctx.window)
        return dq, dk, dv, None, None, None, None


def kept_attention(q, k, v, cu_seqlens, max_seqlen: int, window: tuple[int, int], slot: KeptAttention):
    """flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True,
    window_size=window), run once per checkpointed call (``slot``): the module docstring."""
    return _KeptAttention.apply(q, k, v, cu_seqlens, max_seqlen, tuple(window), slot)


@contextlib.contextmanager
def using(attention, slot: KeptAttention):
    """Within it, ``attention`` (a layer's attention module) keeps its output in ``slot`` or takes it from there."""
    attention.kept = slot
    try:
        yield
    finally:
        attention.kept = None


class OffloadedActivations(torch.autograd.graph.saved_tensors_hooks):
    """Every activation saved for backward inside it waits on the CPU (pinned on a GPU) and comes back to its device
    when backward needs it; parameters stay where they are (their memory is held anyway), and a tensor already on
    the CPU is not copied. ``moved``: the bytes of the activations it took (tests and the memory report read it)."""

    def __init__(self):
        self.moved = 0

        def pack(t: torch.Tensor):
            if isinstance(t, torch.nn.Parameter):
                return None, t
            self.moved += t.numel() * t.element_size()
            if t.device.type == "cpu":
                return None, t
            copy = torch.empty(t.shape, dtype=t.dtype, layout=t.layout, device="cpu", pin_memory=True)
            copy.copy_(t, non_blocking=True)
            return t.device, copy

        def unpack(packed):
            device, t = packed
            return t if device is None else t.to(device, non_blocking=True)

        super().__init__(pack, unpack)
