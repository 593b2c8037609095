"""``scripts/train.py --config X --dry-run [KEY=VALUE ...]``: check a config and say what its run would be, writing
nothing.

The config is loaded and validated with its overrides, the layout checked against the launcher's world size
(``WORLD_SIZE`` under torchrun, ``SLURM_NTASKS`` under srun; alone, the smallest world the layout fits), the
model built on the meta device (nothing allocated), and the data's folders read as training would read them.
The report: the config's differences from evo's defaults, the parameter count, the per-rank memory of the model
state (``evo.parallel.parallelize.computed_memory``), and the data (documents, tokens, packed rows, steps per
epoch, validation sets). No process group starts and no run folder, log or checkpoint is written (reading the
data may fill evo's cache under ``~/.cache/evo``, as training would: a checked data folder, a trained BPE).
"""

from __future__ import annotations

import dataclasses
import math
import os

from evo.config import REQUIRED, TENSOR_MODE, Config, config_from_dict, resolve_config
from evo.data import build_train_loader, build_valid_loaders
from evo.model.flops import whole_model_sizes
from evo.parallel.context import ParallelContext
from evo.parallel.parallelize import MemoryOptions, computed_memory, format_bytes


def launch_world_size(env=os.environ) -> tuple[int, str] | None:
    """(world size, where it came from) when a launcher set it, else None."""
    for key, rank, who in (("WORLD_SIZE", "RANK", "torchrun"), ("SLURM_NTASKS", "SLURM_PROCID", "srun")):
        if env.get(key, "").isdigit() and env.get(rank, "").isdigit():
            return int(env[key]), f"{who}'s {key}"
    return None


def smallest_world(parallel) -> tuple[int, str]:
    """The smallest world ``parallel`` fits, and that this is where it came from."""
    tp, pp, weight = parallel.tensor.size, parallel.pipeline.size, parallel.weight.size
    zero = parallel.zero1.size if parallel.zero1.size > 1 and not TENSOR_MODE[parallel.tensor.mode].weight_parallel \
        else 1
    expert = max(1, parallel.expert.size)  # -1 is as many data ranks as there are: at least one
    dp = math.lcm(zero, weight // math.gcd(weight, tp), expert)
    return pp * tp * dp, "the smallest world this layout fits (no launcher)"


def config_differences(cfg: Config) -> list[str]:
    """'key: value' for every setting that differs from evo's defaults (a default config of the same model shape,
    validated alike, so what validation fills in counts as default); the model's required keys always show."""
    required = [f.name for f in dataclasses.fields(cfg.model) if f.default is REQUIRED]
    base = config_from_dict({"model": {key: getattr(cfg.model, key) for key in required}})
    out = [f"model.{key}: {getattr(cfg.model, key)!r}" for key in required]

    def walk(value, default, prefix):
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name), getattr(default, f.name), f"{prefix}{f.name}.")
        elif value != default:
            out.append(f"{prefix[:-1]}: {value!r}")

    for f in dataclasses.fields(cfg):
        if f.name != "source":
            walk(getattr(cfg, f.name), getattr(base, f.name), f"{f.name}.")
    return out


def data_summary(cfg: Config, ctx: ParallelContext) -> list[str]:
    """What training would read: the training data's documents, tokens and packed rows, and the validation sets."""
    d = cfg.data
    loader, types = build_train_loader(d, ctx, cfg.model.vocab_size)
    where = {"dummy": "random tokens", "builtin": "the Python standard library"}.get(d.type, d.train_folder)
    lines = [f"train: data.type={d.type}, {where}; dataset types {', '.join(types)}"]
    rows = getattr(loader, "rows", None)
    if rows is not None:  # the whole corpus is indexed up front (a streaming loader reads as it goes)
        corpus = rows.corpus
        per_step = ctx.dp_size * d.micro_num
        lines.append(f"  {len(corpus.offsets) - 1} documents, {corpus.num_tokens} tokens, {len(rows)} packed rows "
                     f"of {rows.length} tokens: {len(rows) // per_step} steps per epoch ({per_step} rows a step); "
                     f"data.total_steps={d.total_steps} is {d.total_steps * per_step / max(len(rows), 1):.2f} epochs")
    else:
        lines.append(f"  {len(getattr(loader, 'files', []))} .jsonl files, read as training goes")
    valid = build_valid_loaders(d, ctx, cfg.model.vocab_size)
    if not valid:
        lines.append("validation: none (no validation data: no evaluation will run)")
    for name, v in valid.items():
        lines.append(f"validation '{name}': {len(v)} batches of {d.valid_micro_num} rows")
    return lines


def dry_run(config, overrides=None) -> str:
    """The report of ``scripts/train.py --dry-run`` for ``config`` (a path with the command line's overrides, a
    dict of sections, or a Config)."""
    launched = launch_world_size()
    cfg = resolve_config(config, overrides, launched[0] if launched else None)
    p = cfg.parallel
    world, source = launched or smallest_world(p)
    ctx = ParallelContext.plan(p, world)  # a ConfigError when the layout does not fit the world
    total, matmul = whole_model_sizes(cfg.model)
    savers = MemoryOptions.from_config(cfg)
    memory = computed_memory(cfg.model, world // p.pipeline.size, p.tensor.size, p.zero1.size, ep=ctx.ep_size,
                             memory=savers, tokens=cfg.data.packed_length)
    lines = [f"dry run of {cfg.source or 'a config'}: nothing is written", "", "config (differences from evo's "
             "defaults):", *(f"  {line}" for line in config_differences(cfg)), "",
             f"layout: {ctx.describe().split('; this rank')[0]} ({source})",
             f"model: {total / 1e6:.2f}M parameters ({matmul / 1e6:.2f}M in matmuls), dtype {cfg.model.dtype}",
             "memory per rank (model state): " + ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}"
                                                           for k, v in memory.items()
                                                           if k not in ("layer_weights", "params")) + savers.note()]
    if p.pipeline.size > 1 or TENSOR_MODE[p.tensor.mode].weight_parallel:
        lines.append("  (pipeline stages and isp's weight groups are not modelled here: the numbers are those of "
                     "the whole model over the tensor and zero groups)")
    lines += ["", *data_summary(cfg, ctx)]
    return "\n".join(lines)
