"""Sample from a checkpoint: ``python scripts/generate.py --ckpt DIR --prompt TEXT [--tokens N]``."""

import argparse
import os
import sys

# the repo root replaces the scripts folder on the path: evo imports from a source tree, and
# scripts/tokenize.py does not shadow the standard library's tokenize module
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from evo.checkpoint import latest_checkpoint, load_checkpoint, read_config  # noqa: E402
from evo.cli import run  # noqa: E402
from evo.config import config_from_dict  # noqa: E402
from evo.data.tokenizer import load_tokenizer  # noqa: E402
from evo.errors import CheckpointError  # noqa: E402
from evo.generate import generate  # noqa: E402
from evo.model import build_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description="Generate text from an evo checkpoint.")
    parser.add_argument("--ckpt", required=True, help="a checkpoint folder, or a folder of them (newest is used)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--tokens", type=int, default=128, help="new tokens at most")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = args.ckpt
    if not os.path.isfile(os.path.join(path, "config.json")):
        path = latest_checkpoint(path)
        if path is None:
            raise CheckpointError(f"'{args.ckpt}' is neither a checkpoint nor a folder holding one")
    raw = read_config(path)
    raw = {k: v for k, v in raw.items() if k != "source"}
    cfg = config_from_dict(raw)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg.model, device)
    load_checkpoint(path, {"model": model.state_dict()})
    tokenizer = load_tokenizer(cfg.data.tokenizer_path)
    text = generate(model, tokenizer, args.prompt, args.tokens, args.temperature, args.top_k, args.seed, device)
    print(args.prompt + text)


if __name__ == "__main__":
    run(main)
