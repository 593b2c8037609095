"""Sample from a checkpoint: ``python scripts/generate.py --ckpt DIR --prompt TEXT [--tokens N] [--temperature T]
[--top-k K] [--top-p P] [--seed S] [--no-cache]``. The text goes to stdout; the speed to stderr."""

import argparse
import os
import sys
import time

# the repo root replaces the scripts folder on the path: evo imports from a source tree, and
# scripts/tokenize.py does not shadow the standard library's tokenize module
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from evo.cli import run  # noqa: E402
from evo.data.tokenizer import load_tokenizer  # noqa: E402
from evo.errors import ConfigError  # noqa: E402
from evo.generate import generate_ids  # noqa: E402
from evo.weights import load_model_and_tokenizer  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description="Generate text from an evo checkpoint or a Hugging Face folder.")
    parser.add_argument("--ckpt", required=True, help="a checkpoint folder, a folder of them (newest is used), or a "
                                                      "Hugging Face model folder")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--tokens", type=int, default=128, help="new tokens at most")
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=40, help="sample from the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set reaching p")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="re-run the whole sequence for every token")
    args = parser.parse_args()
    if args.tokens < 1 or args.top_k < 0 or not 0 < args.top_p <= 1:
        raise ConfigError("--tokens must be >= 1, --top-k >= 0 and --top-p in (0, 1]")
    model, tokenizer_path = load_model_and_tokenizer(args.ckpt)
    tokenizer = load_tokenizer(tokenizer_path)
    ids = tokenizer.encode(args.prompt) or [tokenizer.eos_id]
    start = time.perf_counter()
    new = generate_ids(model, ids, args.tokens, args.temperature, args.top_k, args.top_p, args.seed, tokenizer.eos_id,
                       tokenizer.vocab_size, use_cache=not args.no_cache)
    seconds = time.perf_counter() - start
    print(args.prompt + tokenizer.decode(new), flush=True)
    print(f"evo: {len(new)} tokens in {seconds:.2f} s ({len(new) / max(seconds, 1e-9):.1f} tokens/s, prompt "
          f"{len(ids)} tokens, {'no cache' if args.no_cache else 'KV cache'})", file=sys.stderr)


if __name__ == "__main__":
    run(main)
