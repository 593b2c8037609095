"""Sampling text from a model: a KV cache (the prompt runs once, then one token per step), temperature,
top-k and top-p (nucleus) sampling."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from evo.parallel.parallelize import reshard


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens (batch,) from fp32 logits (batch, vocab): greedy when temperature <= 0; else softmax of
    logits / temperature restricted to the top_k most likely tokens (0: all), then to the smallest set of
    most likely tokens whose probability reaches top_p (1: all), renormalized."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        probs, order = torch.softmax(logits, -1).sort(-1, descending=True)
        # drop a token when the tokens more likely than it already reach top_p (the most likely always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 1.0, seed: int = 0, eos_id: int | None = None, vocab_limit: int | None = None,
                 use_cache: bool = True) -> list[int]:
    """Up to ``max_new_tokens`` token ids continuing ``prompt_ids`` (stops after ``eos_id``, which is not
    returned). ``vocab_limit``: sample only ids below it (a model's vocab may be padded past its tokenizer's).
    ``use_cache=False`` re-runs the whole sequence for every token (slow; kept to check the cache against)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    new: list[int] = []
    cache = model.new_kv_cache(1, len(prompt_ids) + max_new_tokens) if use_cache else None
    step_input = prompt_ids
    for _ in range(max_new_tokens):
        if use_cache:
            logits = model(torch.tensor([step_input], dtype=torch.long, device=device), kv_cache=cache)[0, -1]
        else:
            logits = model(torch.tensor(prompt_ids + new, dtype=torch.long, device=device))[-1]
        logits = logits.float().cpu()[None, :vocab_limit]
        nxt = _agree(int(sample_next(logits, temperature, top_k, top_p, gen)[0]), device)
        if nxt == eos_id:
            break
        new.append(nxt)
        step_input = [nxt]
    reshard(model)  # a sharded model's gathered weights are freed (no backward follows)
    model.train(was_training)
    return new


def _agree(token: int, device) -> int:
    """Under several processes every rank runs the same forwards (with collectives inside): all take rank 0's token,
    so that logits differing in the last bit between ranks can never make one stop while the others wait."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([token], dtype=torch.long, device=device)
        dist.broadcast(t, src=0)
        return int(t)
    return token


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8, top_k: int = 40,
             seed: int = 0, top_p: float = 1.0, use_cache: bool = True) -> str:
    """Continue ``prompt`` by up to ``max_new_tokens`` tokens (stops at EOS) on the model's device; returns only
    the new text."""
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    new = generate_ids(model, ids, max_new_tokens, temperature, top_k, top_p, seed, tokenizer.eos_id,
                       tokenizer.vocab_size, use_cache)
    return tokenizer.decode(new)


def load_model(path, device: torch.device | str = "cpu", dtype=None):
    """The model of an evo checkpoint (any layout; a folder of checkpoints: the newest), of a Hugging Face folder
    (``evo.model.hf.FAMILIES``) or of an InternEvo checkpoint folder holding ``model_config.pt``
    (``evo.internevo``), in one process on ``device``, in eval mode; ``dtype`` (a torch dtype or a
    ``model.dtype`` string) overrides the saved one. ``model(input_ids)`` with ``(batch, seqlen)`` ids, one
    sequence per row, returns ``(batch, seqlen, vocab)`` logits."""
    return load_model_and_tokenizer(path, device, dtype)[0]


def load_model_and_tokenizer(path, device: torch.device | str | None = None, dtype=None):
    """(``load_model``'s model, the tokenizer path it was trained with or ships: None when unknown). ``device``
    None: the GPU when there is one."""
    from pathlib import Path

    from evo.checkpoint import load_checkpoint
    from evo.config import config_from_dict
    from evo.convert import checkpoint_model_config, load_hf_weights, read_hf_config, resolve_checkpoint
    from evo.internevo import is_internevo_folder, load_internevo_weights
    from evo.internevo import model_section as internevo_model_section
    from evo.model import build_model

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = Path(path)
    hf = (folder / "config.json").is_file() and not (folder / ".metadata").is_file() and \
        "model_type" in json.loads((folder / "config.json").read_text())
    internevo = not hf and is_internevo_folder(folder)
    if hf or internevo:
        section = read_hf_config(folder)[1] if hf else internevo_model_section(folder)
        cfg = config_from_dict({"model": section}).model
        tokenizer_path = str(folder / "tokenizer.json") if (folder / "tokenizer.json").is_file() else None
    else:
        folder = resolve_checkpoint(folder)
        cfg, tokenizer_path = checkpoint_model_config(folder)
    if dtype is not None:
        cfg = config_from_dict({"model": {**_model_fields(cfg), "dtype": str(dtype) if not isinstance(dtype, str)
                                          else dtype}}).model
    model = build_model(cfg, device)
    if hf:
        load_hf_weights(model, folder)
    elif internevo:
        load_internevo_weights(model, folder)
    else:
        load_checkpoint(folder, {"model": model.state_dict()})
    return model.eval(), tokenizer_path


def _model_fields(cfg) -> dict:
    """A ModelConfig's fields as a ``model`` section again (the derived ones left to be derived)."""
    from dataclasses import fields

    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in cfg.derived}
