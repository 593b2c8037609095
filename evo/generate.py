"""Sampling text from a model: a KV cache (the prompt runs once, then one token per step), temperature,
top-k and top-p (nucleus) sampling. Loading a model from a folder is ``evo.weights`` (``evo.load_model``)."""

from __future__ import annotations

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
