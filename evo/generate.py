"""Sampling text from a trained model (no KV cache: the whole sequence is re-run per token)."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8, top_k: int = 40,
             seed: int = 0, device: torch.device | str = "cpu") -> str:
    """Continue ``prompt`` by up to ``max_new_tokens`` tokens (stops at EOS); returns only the new text."""
    was_training = model.training
    model.eval()
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    new: list[int] = []
    for _ in range(max_new_tokens):
        x = torch.tensor(ids + new, dtype=torch.long, device=device)
        logits = model(x)[-1].float().cpu()
        logits = logits[: tokenizer.vocab_size]  # the model's vocab may be padded beyond the tokenizer's
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        if nxt == tokenizer.eos_id:
            break
        new.append(nxt)
    model.train(was_training)
    return tokenizer.decode(new)
