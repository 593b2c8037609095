"""Hugging Face folders in and out, and dense models upcycled into mixtures of experts:

    python scripts/convert.py to-hf --ckpt CKPT --out HF_DIR [--force] [--max-shard-size BYTES] [--family F]
    python scripts/convert.py from-hf --hf HF_DIR --out CKPT [--force]
    python scripts/convert.py upcycle --ckpt CKPT --out MOE_CKPT --num-experts E --top-k K [--force] [--model-type T]

``to-hf`` writes an evo checkpoint (any layout; a folder of them: the newest), or an InternEvo checkpoint folder
holding ``model_config.pt``, as a transformers folder that
``AutoModelForCausalLM.from_pretrained`` loads (``--family internlm2``: InternLM2's own layout); ``from-hf`` writes a
transformers folder (Llama 2 and 3, Mistral, Qwen2, Qwen3, InternLM2, Qwen3-MoE, Mixtral, Qwen2-MoE) as an evo
checkpoint of the model. Training can also start from a Hugging Face folder directly:
``ckpt.load_ckpt_info=dict(path=HF_DIR, content=("model",), ckpt_type="hf")``. ``upcycle`` writes a dense model as
a MoE evo checkpoint whose experts are copies of each layer's MLP (evo.convert.upcycle): it computes what the dense
model did, and training moves the experts apart.
"""

import argparse
import os
import sys

# the repo root replaces the scripts folder on the path: evo imports from a source tree, and
# scripts/tokenize.py does not shadow the standard library's tokenize module
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from evo.cli import run  # noqa: E402
from evo.convert import MAX_SHARD_BYTES, from_hf, to_hf, upcycle  # noqa: E402
from evo.model.hf import FAMILIES, INTERNLM2  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description="Convert between evo checkpoints and Hugging Face folders.")
    commands = parser.add_subparsers(dest="command", required=True)
    out_hf = commands.add_parser("to-hf", help="an evo checkpoint as a transformers folder")
    out_hf.add_argument("--ckpt", required=True, help="a checkpoint folder, or a folder of them (the newest), or an "
                                                      "InternEvo checkpoint folder")
    out_hf.add_argument("--out", required=True, help="the transformers folder to write")
    out_hf.add_argument("--max-shard-size", type=int, default=MAX_SHARD_BYTES,
                        help=f"bytes per safetensors file (default {MAX_SHARD_BYTES})")
    out_hf.add_argument("--family", choices=(*FAMILIES, INTERNLM2),
                        help="the transformers family to write (default: the one that computes this model); "
                             "internlm2: InternLM2's own layout, packed wqkv")
    in_hf = commands.add_parser("from-hf", help="a transformers folder as an evo checkpoint")
    in_hf.add_argument("--hf", required=True, help="a transformers model folder (config.json, *.safetensors)")
    in_hf.add_argument("--out", required=True, help="the evo checkpoint folder to write")
    up = commands.add_parser("upcycle", help="a dense model as a mixture of experts (every expert a copy of its MLP)")
    up.add_argument("--ckpt", required=True, help="the dense model: an evo checkpoint (or a folder of them), or any "
                    "folder evo.load_model reads")
    up.add_argument("--out", required=True, help="the MoE evo checkpoint folder to write")
    up.add_argument("--num-experts", type=int, required=True)
    up.add_argument("--top-k", type=int, required=True, help="experts per token")
    up.add_argument("--model-type", default="QWEN3MOE", help="the MoE model_type its config records")
    up.add_argument("--router-std", type=float, default=0.02, help="the router's normal-init std")
    up.add_argument("--seed", type=int, default=0, help="the router's seed")
    for sub in (out_hf, in_hf, up):
        sub.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    args = parser.parse_args()
    if args.command == "to-hf":
        out = to_hf(args.ckpt, args.out, force=args.force, max_shard_bytes=args.max_shard_size, family=args.family)
    elif args.command == "from-hf":
        out = from_hf(args.hf, args.out, force=args.force)
    else:
        out = upcycle(args.ckpt, args.out, args.num_experts, args.top_k, force=args.force, model_type=args.model_type,
                      router_std=args.router_std, seed=args.seed)
    print(f"evo: wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    run(main)
