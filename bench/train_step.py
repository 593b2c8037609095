"""End to end: evo's trainer on one device, with evo's Triton kernels against the same model on the reference ops
and against ``torch.compile`` (``model.compile=True``: each decoder layer compiled) of either.

Each provider runs ``Trainer.train()`` (as scripts/train.py does: loader, forward and backward over the step's
micro-batches, fp32 master weights, AdamW, metrics) in a fresh process on InternEvo's random dummy data, and the
row reports the medians over the steps after the warm-up of what the trainer logs: tokens/s per device
(``tgs``), model TFLOP/s, MFU against the vendor's peak (GPU; ``evo.monitor.PEAK_TFLOPS``) and the share of the
bf16 matmul peak measured in the same run (bench/common.py's ``device_peaks``), and the peak memory allocated.

Cases: on a GPU a Llama-3.2-1B-shaped model (16 layers, hidden 2048, 32 query / 8 KV heads, MLP 8192, vocab
128256, tied embeddings), bf16, 4096-token rows, 4 micro-batches a step (16k tokens); on a CPU configs/tiny.py's
model in fp32 on 512-token rows, the reference ops only (evo's kernels are Triton: a GPU's). The model FLOPs are
``evo.model.flops.step_flops``: 6 N tokens + the attention term (docs/performance.md).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LLAMA_1B = dict(num_layers=16, hidden_size=2048, num_attention_heads=32, num_kv_attention_heads=8,
                intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_base=500000,
                dtype="torch.bfloat16")
TINY = dict(num_layers=4, hidden_size=256, num_attention_heads=4, num_kv_attention_heads=2, vocab_size=258,
            multiple_of=64, dtype="torch.float32")
# provider -> (kernel backend, model.compile); evo first (the MFU goal is its), the compiled ones last (slowest to
# start): a run cut short by its timeout has measured the first
PROVIDERS = {"evo": ("triton", False), "reference": ("torch", False), "evo+compile": ("triton", True),
             "reference+compile": ("torch", True)}


def sections(device: str, compile_layers: bool, steps: int, folder: str, smoke: bool = False) -> dict:
    """The run's config sections."""
    model, seq_len, micro_num = (TINY, 512, 2) if device == "cpu" else (LLAMA_1B, 4096, 4)
    if smoke:
        model, seq_len, micro_num = dict(TINY, num_layers=2, dtype="torch.bfloat16"), 64, 2
    return {"model": dict(model, compile=compile_layers),
            "data": dict(type="dummy", seq_len=seq_len, micro_bsz=1, micro_num=micro_num, total_steps=steps,
                         valid_every=0, num_dummy_samples=64, min_length=seq_len // 4),
            "adam": dict(lr=1e-4), "ckpt": dict(enable_save_ckpt=False),
            "monitor": dict(run_folder=folder, sample_prompt=None)}


def child(provider: str, device: str, steps: int, folder: str, smoke: bool) -> None:
    """One run, in this process: the trainer's metrics are in ``folder``/metrics.jsonl; the peak memory is
    printed as the last line."""
    import torch

    from evo import (TrainerBuilder, build_train_loader_with_data_type, initialize_distributed_env,
                     initialize_model_and_parallel_communicator, kernels)

    backend, compile_layers = PROVIDERS[provider]
    with kernels.use_backend(backend):
        initialize_distributed_env(config=sections(device, compile_layers, steps, folder, smoke), launcher="local",
                                   seed=0)
        model = initialize_model_and_parallel_communicator()
        loader, types = build_train_loader_with_data_type()
        trainer = TrainerBuilder(model, loader, {}, dataset_types=types)
        trainer.train()
        trainer.monitor.close()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    print(json.dumps({"peak_memory_gib": peak}))


def run_provider(provider: str, device: str, steps: int, warmup: int, smoke: bool = False) -> dict:
    """Medians over the measured steps of one provider's run, in a fresh process."""
    with tempfile.TemporaryDirectory() as folder:
        # -m from the repository root: the root, not bench/, comes first on the child's path
        out = subprocess.run([sys.executable, "-m", "bench.train_step", provider, device, str(steps), folder,
                              str(int(smoke))], cwd=ROOT, capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            return {"error": (out.stderr.strip().splitlines() or ["exit %d" % out.returncode])[-1][:200]}
        records = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in records if "tgs" in r][warmup:]
    row = {"steps": len(measured), "tokens_per_s": statistics.median(r["tgs"] for r in measured),
           "tokens_per_s_min": min(r["tgs"] for r in measured), "tokens_per_s_max": max(r["tgs"] for r in measured),
           "TFLOP_s": statistics.median(r["tflops"] for r in measured), "loss_first": records[0]["loss"]}
    if all("mfu" in r for r in measured):
        row["mfu"] = statistics.median(r["mfu"] for r in measured)
    row["peak_memory_gib"] = json.loads(out.stdout.strip().splitlines()[-1])["peak_memory_gib"]
    return row


def run(quick: bool, device: str, smoke: bool = False) -> list[dict]:
    if device == "cuda":
        names = list(PROVIDERS)
    else:  # on a CPU evo's kernels are the reference; --quick leaves out the minute of compiling
        names = ["evo", "reference"] if smoke else ["reference"] if quick else ["reference", "reference+compile"]
    warmup, measured = (1, 2) if smoke else (3, 5) if quick else (5, 15)
    case = "tiny (smoke)" if smoke else "llama-1b seq 4096 bf16" if device == "cuda" else "tiny fp32 seq 512"
    rows = []
    for name in names:
        rows.append({"case": case, "provider": name, "layout": "1 device",
                     **run_provider(name, device, warmup + measured, warmup, smoke)})
    return check_losses(rows, tolerance=2e-2 if device == "cuda" or smoke else 1e-4)


def check_losses(rows: list[dict], tolerance: float) -> list[dict]:
    """The correctness check before a time is reported: every provider's first-step loss (same weights, same
    data) against the reference run's; a provider off by more than ``tolerance`` (relative) loses its numbers
    and gets an error."""
    reference = next((r["loss_first"] for r in rows if r["provider"] == "reference" and "loss_first" in r), None)
    for row in rows:
        if reference is None or "loss_first" not in row:
            continue
        off = abs(row["loss_first"] - reference) / abs(reference)
        row["loss_vs_reference"] = off
        if off > tolerance:
            for key in ("tokens_per_s", "tokens_per_s_min", "tokens_per_s_max", "TFLOP_s", "mfu"):
                row.pop(key, None)
            row["error"] = f"wrong result: first-step loss {row['loss_first']:.5g}, the reference's {reference:.5g}"
    return rows


if __name__ == "__main__":
    provider_, device_, steps_, folder_, smoke_ = sys.argv[1:6]
    child(provider_, device_, int(steps_), folder_, smoke_ == "1")
