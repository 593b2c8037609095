"""Framework overhead: evo's trainer against a plain PyTorch loop over the same model, data and optimizer.

The model is configs/tiny.py's (fp32, the reference ops on a CPU, Triton's kernels on a GPU), trained on the
built-in corpus for ``STEPS`` steps of ``data.micro_num`` packed rows:
- evo: ``Trainer.train()`` as ``scripts/train.py`` runs it (loader, schedule, loss scaling by the step's label
  count, fp64 gradient norm and clipping, AdamW, lr schedule, per-step metrics and logs; no evaluation,
  checkpoint or sample);
- plain: a loop written here calling evo's own model and loss: for each micro-batch forward with labels,
  ``sum / label count``, backward; then ``torch.optim.AdamW.step`` and ``zero_grad``. Nothing else.
Both start from the same weights and read the same loader. Runs alternate (evo, plain, evo, ...) so that
the machine's drift hits both; the result is evo's tokens/s over the plain loop's, the median over the pairs.
Goal: >= 0.95.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20


def _sections(folder: Path, steps: int) -> dict:
    from evo.config import read_config_file

    raw = read_config_file(ROOT / "configs" / "tiny.py")
    raw["data"].update(total_steps=steps, valid_every=0)
    raw["ckpt"] = dict(enable_save_ckpt=False)
    raw["monitor"] = dict(run_folder=str(folder), sample_prompt=None)
    return raw


def evo_run(folder: Path, steps: int) -> float:
    """tokens/s of evo's trainer."""
    from evo import (TrainerBuilder, build_train_loader_with_data_type, initialize_distributed_env,
                     initialize_model_and_parallel_communicator)

    initialize_distributed_env(config=_sections(folder, steps), launcher="local", seed=0)
    model = initialize_model_and_parallel_communicator()
    loader, types = build_train_loader_with_data_type()
    trainer = TrainerBuilder(model, loader, {}, dataset_types=types)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.monitor.close()
    return trainer.num_consumed_tokens / seconds


def plain_run(folder: Path, steps: int) -> float:
    """tokens/s of the plain loop (same model, weights, loader and AdamW settings)."""
    from evo.config import config_from_dict
    from evo.data import build_train_loader
    from evo.data.packing import IGNORE_INDEX
    from evo.model import build_model
    from evo.parallel import ParallelContext

    cfg = config_from_dict(_sections(folder, steps))
    model = build_model(cfg.model, "cpu" if not torch.cuda.is_available() else "cuda", seed=0)
    dev = next(model.parameters()).device
    loader, _ = build_train_loader(cfg.data, ParallelContext(device=dev), cfg.model.vocab_size)
    a = cfg.adam
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=a.lr, betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_eps, foreach=False)
    batches = iter(loader)
    tokens = 0
    start = time.perf_counter()
    for _ in range(steps):
        inputs, labels = next(batches)
        count = max(int((labels != IGNORE_INDEX).sum()), 1)
        for i in range(labels.shape[0]):
            cu = inputs["cu_seqlens"][i].to(dev)
            loss = model(inputs["input_ids"][i].to(dev), cu, int((cu[1:] - cu[:-1]).max()), labels=labels[i].to(dev))
            (loss.sum() / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        tokens += int((inputs["type_ids"] >= 0).sum())
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - start)


def run(quick: bool, device: str) -> list[dict]:
    import tempfile

    pairs = 2 if quick else 7
    evo_tps, plain_tps = [], []
    with tempfile.TemporaryDirectory() as tmp:
        evo_run(Path(tmp) / "warmup", 2)  # imports, the built-in corpus tokenized once, allocator warm
        plain_run(Path(tmp) / "warmup-plain", 2)
        for i in range(pairs):
            evo_tps.append(evo_run(Path(tmp) / f"evo{i}", STEPS))
            plain_tps.append(plain_run(Path(tmp) / f"plain{i}", STEPS))
    ratios = [e / p for e, p in zip(evo_tps, plain_tps)]
    return [{"case": f"tiny model, {STEPS} steps, evo trainer vs plain loop", "kind": "overhead", "pairs": pairs,
             "evo_tokens_per_s": statistics.median(evo_tps), "plain_tokens_per_s": statistics.median(plain_tps),
             "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
             "goal": 0.95}]
