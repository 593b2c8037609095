"""Write an InternEvo checkpoint folder from a transformers Llama state dict, as InternEvo's
``save_model_checkpoint`` lays one out (read from its code, written here apart from evo's reader):

- one ``torch.save`` of a stage's ``state_dict()`` per rank that saves: ``model_tp{t}_pp{p}.pt`` for tensor modes
  mtp/msp/fsp (every tp rank), ``model_tp{t}_wp{w}_pp{p}.pt`` for isp (ranks r < max(tp, wp) save, as tp rank
  r % tp and weight rank r % wp); keys are bare names, or under ``model.`` when the AMP wrapper was not taken off;
- ``partition_uniform``: each chunk's layers split over the pipeline ranks, the remainder to the last ranks; a
  stage numbers its layers from 0; chunked models save as ``{chunk}.model.<name>``;
- column-parallel linears (wqkv or wq/wk/wv, w1, w3) split by rows over tp, row-parallel ones (wo, w2) by
  columns with their bias on tp rank 0; under isp every layer linear splits by rows over wp; the embedding
  (``Embedding1D``) splits by hidden over tp, flash-attn's ``word_embeddings`` by vocab; the head by rows;
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


def stages(num_layers, pp, chunks):
    """partition_uniform: [(rank, chunk, first layer, layer count)] in the order the layers run."""
    out = []
    per_chunk = num_layers // chunks
    for c in range(chunks):
        base = c * per_chunk
        size, left = per_chunk // pp, pp - per_chunk % pp
        for p in range(pp):
            n = size + (p >= left)
            out.append((p, c, base, n))
            base += n
    return out


def shard(name, tensor, t, tp, w, wp, isp):
    """This rank's part of one whole tensor; None where the rank holds none of it."""
    if name.endswith("norm.weight"):
        return tensor
    if name.startswith("tok_embeddings.") or name.startswith("output."):
        dim = 1 if name == "tok_embeddings.weight" else 0
        return tensor.tensor_split(tp, dim)[t].clone()
    if isp:
        return tensor.tensor_split(wp, 0)[w].clone()
    if ".attention.wo." in name or ".feed_forward.w2." in name:
        if name.endswith(".bias"):
            return tensor if t == 0 else None
        return tensor.tensor_split(tp, 1)[t].clone()
    return tensor.tensor_split(tp, 0)[t].clone()


def write_folder(folder, hf_state, config, *, tp=1, pp=1, wp=None, chunks=1, internlm2=True, adapt_hf=None,
                 vocab_split=False, wrapped=False):
    """An InternEvo folder of the transformers Llama weights ``hf_state``; ``wp`` set means isp. ``adapt_hf`` is
    written into ``model_config.pt`` unless None (then the model's default holds: InternLM2 True, Llama False)."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = not (internlm2 if adapt_hf is None else adapt_hf)
    whole = internevo_names(hf_state, config, internlm2, pairs, vocab_split)
    isp = wp is not None
    plan = stages(config.num_hidden_layers, pp, chunks)
    last = len(plan) - 1  # the plan runs in layer order: the last stage holds the norm and the head
    savers = [(r % tp, r % wp) for r in range(max(tp, wp))] if isp else [(t, 0) for t in range(tp)]
    for p in range(pp):
        for t, w in savers:
            state = {}
            for index, (rank, c, first, n) in enumerate(plan):
                if rank != p:
                    continue
                prefix = f"{c}.model." if chunks > 1 else "model." if wrapped else ""
                for name, tensor in whole.items():
                    if name.startswith("layers."):
                        i = int(name.split(".")[1])
                        if not first <= i < first + n:
                            continue
                        local = f"layers.{i - first}.{name.split('.', 2)[2]}"
                    elif name.startswith("tok_embeddings.") and (c, p) != (0, 0):
                        continue
                    elif name.startswith(("norm.", "output.")) and index != last:
                        continue
                    else:
                        local = name
                    part = shard(name, tensor, t, tp, w, wp, isp)
                    if part is not None:
                        state[prefix + local] = part
            file = f"model_tp{t}_wp{w}_pp{p}.pt" if isp else f"model_tp{t}_pp{p}.pt"
            torch.save(state, folder / file)
    if adapt_hf is not None:
        save_model_section(folder / "model_config.pt", dict(num_layers=config.num_hidden_layers, adapt_hf=adapt_hf,
                                                            dtype=torch.bfloat16))
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
