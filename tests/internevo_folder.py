"""Write an InternEvo checkpoint folder from a transformers Llama state dict, as InternEvo's
``save_model_checkpoint`` lays one out. Read from InternEvo's code (DoorKickers/InternEvo at 58f723a, 2025-03,
its develop branch; the names below are its), and written here apart from evo's reader:

- files (``internlm/checkpoint/components.py``): one ``torch.save`` of a stage's ``state_dict()`` per saving rank:
  ``model_tp{t}_pp{p}.pt`` for tensor modes mtp/msp/fsp (every tp rank), ``model_wp{w}_pp{p}.pt`` for isp (the
  rank of each weight-parallel group whose weight-data rank is 0); with ``early=True`` isp as saved from 2024-02
  to 2024-07: ``model_tp{t}_wp{w}_pp{p}.pt`` from ranks r < max(tp, wp), as tp rank r % tp and weight rank
  r % wp. Keys are bare names, or under ``model.`` when the AMP wrapper was not taken off; beside them
  ``model_config.pt`` (the model section) and ``config_file.pt`` (the config file's text);
- ``partition_uniform`` (``internlm/core/parallel/shard.py``): each chunk's layers split over the pipeline ranks,
  the remainder to the ranks that come last, the second chunk running from the last rank down under
  ``mode="ZBV"``; a stage numbers its layers from 0; chunked models save as ``{chunk}.model.<name>``;
- the group a tensor is split over, ``get_tensor_split_parallel_mode``: the weight-parallel group under isp,
  else the tensor group. ``get_parallel_strategies_split_mode``: wqkv/wq/wk/wv, w1, w3 are "column" (rows
  split), wo and w2 "row" (columns split; each rank keeps the whole bias, tp rank 0's is written) but "column"
  under isp; the head (``ScaleColumnParallelLinear``) splits rows; ``Embedding1D`` splits hidden (dim 1), the
  early flash-attn ``word_embeddings`` the vocab; under ``early`` isp the embedding and head were split over tp;
- InternLM2's wqkv rows are "(h gs d)": per kv head its query heads, key, value;
- with ``adapt_hf=False`` q and k rows are stored for GPT-J pairs: the model turns them into halves at run time
  with ``torch.cat([q[..., ::2], q[..., 1::2]], dim=-1)``, so the halves layout of transformers is recovered.
"""

import pickle
import sys
import types

import torch

from tests.test_convert import internlm2_pack

# transformers' Llama name -> InternEvo's, within a layer
LAYER = {"self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
         "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
         "post_attention_layernorm": "ffn_norm"}


def to_pairs(rows, head_dim):
    """q or k rows for halves rotary, stored so that rows[..., ::2] then rows[..., 1::2] gives the halves back."""
    heads = rows.reshape(-1, 2, head_dim // 2, *rows.shape[1:])
    return heads.transpose(1, 2).reshape(rows.shape)


def internevo_names(hf_state, config, internlm2, pairs, vocab_split=False):
    """The whole tensors under InternEvo's names (global layer indices)."""
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    d = config.hidden_size // heads
    embed = "tok_embeddings.word_embeddings.weight" if vocab_split else "tok_embeddings.weight"
    out = {embed: hf_state["model.embed_tokens.weight"], "norm.weight": hf_state["model.norm.weight"],
           "output.weight": hf_state.get("lm_head.weight", hf_state["model.embed_tokens.weight"])}
    for i in range(config.num_hidden_layers):
        src = f"model.layers.{i}."
        for kind in ("weight", "bias"):
            qkv = [hf_state.get(f"{src}self_attn.{x}_proj.{kind}") for x in "qkv"]
            if qkv[0] is not None:
                q, k, v = qkv
                if pairs:
                    q, k = to_pairs(q, d), to_pairs(k, d)
                if internlm2:
                    out[f"layers.{i}.attention.wqkv.{kind}"] = internlm2_pack(q, k, v, kv)
                else:
                    out.update({f"layers.{i}.attention.w{x}.{kind}": t for x, t in zip("qkv", (q, k, v))})
            for theirs, ours in LAYER.items():
                if f"{src}{theirs}.{kind}" in hf_state:
                    out[f"layers.{i}.{ours}.{kind}"] = hf_state[f"{src}{theirs}.{kind}"]
    return out


def stages(num_layers, pp, chunks, zbv=False):
    """partition_uniform: [(rank, chunk, first layer, layer count)] in the order the layers run."""
    out = []
    per_chunk = num_layers // chunks
    for c in range(chunks):
        base = c * per_chunk
        size, left = per_chunk // pp, pp - per_chunk % pp
        if zbv and c == 1:
            for p in range(pp - 1, -1, -1):
                n = size + ((pp - p - 1) >= left)
                out.append((p, c, base, n))
                base += n
        else:
            for p in range(pp):
                n = size + (p >= left)
                out.append((p, c, base, n))
                base += n
    return out


def shard(name, tensor, t, tp, w, wp, isp, early):
    """This rank's part of one whole tensor; None where the rank holds none of it."""
    if name.endswith("norm.weight"):
        return tensor
    rank, size = (w, wp) if isp else (t, tp)  # get_tensor_split_parallel_mode's group
    if name.startswith("tok_embeddings.") or name.startswith("output."):
        if early:
            rank, size = t, tp
        dim = 1 if name == "tok_embeddings.weight" else 0
        return tensor.tensor_split(size, dim)[rank].clone()
    if not isp and (".attention.wo." in name or ".feed_forward.w2." in name):  # "row"
        if name.endswith(".bias"):
            return tensor if t == 0 else None
        return tensor.tensor_split(size, 1)[rank].clone()
    return tensor.tensor_split(size, 0)[rank].clone()  # "column"


def write_folder(folder, hf_state, config, *, tp=1, pp=1, wp=None, chunks=1, schedule="1F1B", internlm2=True,
                 adapt_hf=None, vocab_split=False, wrapped=False, early=False, config_file=True):
    """An InternEvo folder of the transformers Llama weights ``hf_state``; ``wp`` set means isp (``early``: as
    saved before 2024-07). ``adapt_hf`` is written into ``model_config.pt`` unless None (then the model's default
    holds: InternLM2 True, Llama False). ``config_file``: write ``config_file.pt``, the config text that names
    the pipeline ``schedule``."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = not (internlm2 if adapt_hf is None else adapt_hf)
    whole = internevo_names(hf_state, config, internlm2, pairs, vocab_split)
    isp = wp is not None
    plan = stages(config.num_hidden_layers, pp, chunks, zbv=schedule == "ZBV")
    if not isp:
        savers = [(t, 0) for t in range(tp)]
    elif early:
        savers = [(r % tp, r % wp) for r in range(max(tp, wp))]
    else:
        savers = [(0, w) for w in range(wp)]
    for p in range(pp):
        for t, w in savers:
            state = {}
            for rank, c, first, n in plan:
                if rank != p:
                    continue
                prefix = f"{c}.model." if chunks > 1 else "model." if wrapped else ""
                for name, tensor in whole.items():
                    if name.startswith("layers."):
                        i = int(name.split(".")[1])
                        if not first <= i < first + n:
                            continue
                        local = f"layers.{i - first}.{name.split('.', 2)[2]}"
                    elif name.startswith("tok_embeddings.") and first != 0:  # pipeline_parallel_sharding_wrapper
                        continue
                    elif name.startswith(("norm.", "output.")) and first + n != config.num_hidden_layers:
                        continue
                    else:
                        local = name
                    part = shard(name, tensor, t, tp, w, wp, isp, early)
                    if part is not None:
                        state[prefix + local] = part
            file = (f"model_tp{t}_wp{w}_pp{p}.pt" if early else f"model_wp{w}_pp{p}.pt") if isp else \
                f"model_tp{t}_pp{p}.pt"
            torch.save(state, folder / file)
    if adapt_hf is not None:
        save_model_section(folder / "model_config.pt", dict(num_layers=config.num_hidden_layers, adapt_hf=adapt_hf,
                                                            dtype=torch.bfloat16, num_chunks=chunks))
    if config_file:  # the config file's text, as the trainer read it
        mode = "isp" if isp else "mtp"
        torch.save(f"""JOB_NAME = "tiny"
model = dict(num_layers={config.num_hidden_layers}, num_chunks={chunks})
parallel = dict(
    zero1=dict(size=-1),
    tensor=dict(size={tp}, mode="{mode}"),
    pipeline=dict(size={pp}, interleaved_overlap=True, mode="{schedule}"),
    weight=dict(size={wp or 1}, overlap=True),
)
""", folder / "config_file.pt")
    return folder


def save_model_section(path, fields):
    """``model_config.pt`` as InternEvo writes it: its ``Config`` (a dict subclass from
    ``internlm.core.context.parallel_context``) pickled by torch.save."""
    names = ["internlm", "internlm.core", "internlm.core.context", "internlm.core.context.parallel_context"]
    modules = {name: types.ModuleType(name) for name in names}
    config_class = type("Config", (dict,), {"__module__": names[-1]})
    modules[names[-1]].Config = config_class
    saved = {name: sys.modules.get(name) for name in names}
    sys.modules.update(modules)
    try:
        torch.save(config_class(fields), path, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
