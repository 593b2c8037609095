"""Hugging Face folders in and out (``scripts/convert.py``); reading one into a model of any layout is
``evo.weights``'.

- ``to_hf(ckpt, out)``: an evo checkpoint (any layout) as a transformers folder: ``config.json`` with every
  field written out (``evo.model.hf.hf_config_from_model``), the weights as safetensors (split into
  ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json`` past ``max_shard_bytes``),
  ``generation_config.json``, and the tokenizer when the run used a ``tokenizer.json``. Tensors are read from
  the checkpoint one at a time, and a shard is written as soon as it is full.
- ``from_hf(hf_dir, out)``: a transformers folder as an evo checkpoint holding the model (``load_ckpt_info``
  content ``("model",)``). It holds the whole model in its stored dtype in memory while it writes.
- reading a transformers folder into a model of any layout (``ckpt.load_ckpt_info=dict(path=HF_DIR,
  content=("model",), ckpt_type="hf")``) is ``evo.weights.load_weights``: each rank reads only its part.

The families are ``evo.model.hf.FAMILIES``; a model written with evo's GPT-J rotary layout
(``qk_interleaved=True``) has its q and k rows reordered for transformers' halves layout on the way out.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from evo.checkpoint import SafeReader, replace_folder, require_tensor
from evo.errors import CheckpointError, ConfigError
from evo.model.hf import (INTERNLM2, MOE_FAMILIES, hf_config_from_model, hf_family, hf_moe_names, hf_name,
                          internlm2_config_from_model, internlm2_name, interleaved_to_halves, pack_wqkv)
from evo.weights import folder_kind, load_hf_weights, open_folder, read_hf_config

MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ConfigError(f"output folder '{out}' exists and is not empty: choose another, or pass --force to "
                          "replace it")


# ---------------------------------------------------------------------------------------------- to Hugging Face
def to_hf(ckpt: str | Path, out: str | Path, force: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES,
          family: str | None = None) -> Path:
    """Write evo checkpoint ``ckpt`` (or an InternEvo checkpoint folder holding ``model_config.pt``:
    ``evo.internevo``) as a transformers folder ``out``; returns ``out``. ``family``: the transformers
    family to write (default: the one that computes this model, ``evo.model.hf.hf_family``), or ``"internlm2"``
    for InternLM2's own layout (packed ``wqkv``; its modeling code comes from InternLM's repositories)."""
    from evo.data.tokenizer import load_tokenizer

    _check_out(Path(out), force)
    # a transformers folder is not converted to itself: it is refused as no evo checkpoint
    folder = open_folder(ckpt, "evo" if folder_kind(ckpt) == "hf" else None)
    path, cfg, out = folder.path, folder.model, Path(out)
    internevo = folder.kind == "internevo"
    tokenizer_path = None if internevo else folder.tokenizer_path
    try:  # an InternEvo folder does not say which tokenizer it was trained with
        tokenizer = None if internevo else load_tokenizer(tokenizer_path)
    except Exception:  # noqa: BLE001 - the tokenizer only adds ids and files; the weights are what is converted
        tokenizer = None
    ids = getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None)
    internlm2 = family == INTERNLM2
    try:
        if family not in (None, INTERNLM2) and family != hf_family(cfg):
            raise ValueError(f"it computes as {hf_family(cfg)}, not {family}")
        hf_config = internlm2_config_from_model(cfg, *ids) if internlm2 else hf_config_from_model(cfg, *ids)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint '{path}' cannot be written for transformers: {exc}") from None
    tmp = out.with_name(out.name + ".tmp-evo")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = _internevo_tensors(path, cfg) if internevo else _checkpoint_tensors(path, cfg)
    moe = hf_config["model_type"] if hf_config["model_type"] in MOE_FAMILIES else None
    _write_safetensors(tmp, _hf_tensors(tensors, cfg, internlm2, moe), max_shard_bytes)
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    generation = {"bos_token_id": hf_config["bos_token_id"], "eos_token_id": hf_config["eos_token_id"]}
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
    # the byte tokenizer (no file of its own) only for a model of its vocabulary: a run on dummy data has none
    exported = tokenizer is not None and (getattr(tokenizer, "path", None) or (
        hasattr(tokenizer, "save_json") and tokenizer_path is not None and cfg.vocab_size == tokenizer.vocab_size))
    if exported:  # a tokenizer.json (evo's BPE included), or the byte tokenizer written as one
        if getattr(tokenizer, "path", None):
            shutil.copyfile(tokenizer.path, tmp / "tokenizer.json")
        else:
            tokenizer.save_json(tmp / "tokenizer.json")
        special = {"bos_token": tokenizer.token(tokenizer.bos_id), "eos_token": tokenizer.token(tokenizer.eos_id)}
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", **{k: v for k, v in special.items() if v}}, indent=2))
    replace_folder(tmp, out)
    return out


def _checkpoint_tensors(path: Path, cfg):
    """(evo name, tensor) for each model tensor of evo checkpoint ``path``, read one at a time in transformers'
    order (the head left out when tied: transformers ties it to the embedding)."""
    import torch.distributed.checkpoint as dcp

    reader = SafeReader(path)  # .metadata unpickled with DCP's own types only
    stored = reader.read_metadata().state_dict_metadata
    names = [key[len("model."):] for key in stored if key.startswith("model.")]
    if cfg.tie_word_embeddings:
        names = [n for n in names if n != "output.weight"]
    for name in sorted(names, key=_hf_order):
        meta = stored[f"model.{name}"]
        require_tensor(path, f"model.{name}", meta)
        tensor = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": {name: tensor}}, storage_reader=reader)
        yield name, tensor


def _internevo_tensors(folder: Path, cfg):
    """(evo name, tensor) for each model tensor of InternEvo folder ``folder``, one at a time in transformers'
    order."""
    from evo.internevo import internevo_tensors
    from evo.model import build_model

    names = [n for n, _ in build_model(cfg, "meta").named_parameters()]  # a tied head is not listed twice
    for name, _, tensor in internevo_tensors(folder, cfg, sorted(names, key=_hf_order)):
        yield name, tensor


def _hf_tensors(tensors, cfg, internlm2: bool, moe_family: str | None = None):
    """(Hugging Face name, tensor) for each (evo name, tensor) of ``tensors`` (in transformers' order), in
    ``cfg.dtype``: q/k rows in the halves rotary layout; InternLM2's q, k, v packed; a MoE layer's 3-D expert
    weights one tensor per expert, as transformers saves them (``evo.model.hf.hf_moe_names``)."""
    qkv: dict[str, dict[str, torch.Tensor]] = {}  # InternLM2: a layer's q, k, v parts until all three are read
    for name, tensor in tensors:
        tensor = tensor.to(cfg.torch_dtype)
        module, kind = name.rsplit(".", 2)[-2:]
        moe_names = hf_moe_names(name, moe_family, cfg.num_experts) if moe_family else None
        if moe_names is not None:  # a 3-D expert weight goes out one expert at a time
            yield from zip(moe_names, tensor.unbind(0) if ".experts." in name else (tensor,))
            continue
        if cfg.qk_interleaved and module in ("wq", "wk", "q_norm", "k_norm"):
            tensor = interleaved_to_halves(tensor, cfg.head_dim)
        if internlm2 and module in ("wq", "wk", "wv"):
            prefix = name.rsplit(".", 2)[0]  # layers.N.attention
            parts = qkv.setdefault(f"{prefix}.{kind}", {})
            parts[module] = tensor
            if len(parts) == 3:
                yield f"model.{prefix}.wqkv.{kind}", pack_wqkv(parts["wq"], parts["wk"], parts["wv"], cfg.kv_heads)
                del qkv[f"{prefix}.{kind}"]
        elif internlm2:
            yield internlm2_name(name), tensor
        else:
            yield hf_name(name), tensor


def _write_safetensors(folder: Path, tensors, max_shard_bytes: int) -> None:
    """Write (name, tensor) pairs into safetensors files of at most ``max_shard_bytes`` (a larger tensor alone),
    each as soon as it is full, named as transformers names them: one ``model.safetensors``, or
    ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    shards: list[list[str]] = []  # the tensor names of each file written
    current, size, total = {}, 0, 0  # the file being filled, its bytes; all bytes

    mode = 0o666 & ~_umask()  # safetensors writes its files 0600; exported files take the umask's mode, as open()

    def write():
        path = folder / f"shard-{len(shards)}.safetensors"
        save_file(current, str(path), metadata={"format": "pt"})
        os.chmod(path, mode)
        shards.append(list(current))

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            write()
            current, size = {}, 0
        current[name] = tensor.contiguous()
        size += nbytes
        total += nbytes
    write()
    if len(shards) == 1:
        os.replace(folder / "shard-0.safetensors", folder / "model.safetensors")
        return
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(folder / f"shard-{i}.safetensors", folder / file)
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _umask() -> int:
    """The process's umask: from /proc where Linux shows it, else read by setting it and setting it back."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _hf_order(name: str):
    """Embedding, layers in order, final norm, head: the order transformers lists them."""
    if name.startswith("layers."):
        return (1, int(name.split(".")[1]), name)
    return (0 if name.startswith("tok_embeddings") else 2, 0, name)


# ---------------------------------------------------------------------------------------------- from Hugging Face
def from_hf(hf_dir: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write the transformers folder ``hf_dir`` as an evo checkpoint ``out`` holding the model (load it with
    ``ckpt.load_ckpt_info=dict(path=out, content=("model",))``); returns ``out``."""
    from evo.config import model_config
    from evo.model import build_model

    hf_dir, out = Path(hf_dir), Path(out)
    _check_out(out, force)
    _, section = read_hf_config(hf_dir)
    cfg = model_config(section)
    model = build_model(cfg, "cpu")
    load_hf_weights(model, hf_dir)
    tokenizer = hf_dir / "tokenizer.json"
    return _write_model_checkpoint(model, out, {"model": section}, tokenizer if tokenizer.is_file() else None,
                                   {"from_hf": str(hf_dir)})


def _write_model_checkpoint(model, out: Path, config: dict, tokenizer_path, origin: dict) -> Path:
    """``model`` as an evo checkpoint ``out`` holding the model alone: its tensors (DCP), ``config.json`` (``config``
    and the tokenizer: a ``tokenizer.json`` file is copied in, a built-in tokenizer's name kept), a train state at
    step 0 saying where it came from (``origin``); written beside ``out`` and moved into place whole."""
    import torch.distributed.checkpoint as dcp

    tmp = out.with_name(out.name + ".tmp-evo")
    shutil.rmtree(tmp, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp))
    data = {}
    if tokenizer_path and Path(tokenizer_path).is_file():
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        data["tokenizer_path"] = str(out.resolve() / "tokenizer.json")
    elif tokenizer_path:  # a built-in tokenizer's name ("byte", "bpe")
        data["tokenizer_path"] = tokenizer_path
    torch.save({"step": 0, **origin}, tmp / "train_state.pt")
    (tmp / "config.json").write_text(json.dumps({**config, "data": data}, indent=2))
    replace_folder(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------- upcycling
def upcycle(ckpt: str | Path, out: str | Path, num_experts: int, top_k: int, force: bool = False,
            model_type: str = "QWEN3MOE", router_std: float = 0.02, seed: int = 0) -> Path:
    """Write the dense model of ``ckpt`` (an evo checkpoint, or any folder ``evo.load_model`` reads) as a MoE evo
    checkpoint ``out``: every layer's MLP becomes ``num_experts`` copies of itself, routed ``top_k`` at a time by a
    router drawn from normal(0, ``router_std``) (seeded), the weights of a token's experts normalised to sum to 1. So
    the upcycled model computes what the dense one did until training moves its experts apart. The rest of the
    model is copied; the config is the dense one's with the MoE keys (``model_type`` labels it)."""
    from evo.config import MOE_MODEL_TYPES, model_config
    from evo.model import build_model
    from evo.model.moe import moe_blocks
    from evo.weights import load_model_and_tokenizer, model_fields

    out = Path(out)
    _check_out(out, force)
    if model_type not in MOE_MODEL_TYPES:
        raise ConfigError(f"--model-type must be one of {', '.join(MOE_MODEL_TYPES)}, got {model_type!r}")
    dense, tokenizer_path = load_model_and_tokenizer(ckpt, "cpu")
    cfg = dense.cfg
    if cfg.num_experts > 1:
        raise ConfigError(f"'{ckpt}' holds a MoE model already ({cfg.num_experts} experts): upcycle takes a dense one")
    if cfg.mlp_bias:
        raise ConfigError(f"'{ckpt}' has MLP biases, which evo's experts do not have: it cannot be upcycled")
    section = model_fields(cfg)
    section.update(num_experts=num_experts, top_k=top_k, moe_type="Dropless", moe_intermediate_size=cfg.intermediate_size,
                   moe_layer_kwargs=dict(scoring_func="softmax", normalize_expert_weights=True))
    moe_cfg = model_config(section, model_type)
    model = build_model(moe_cfg, "cpu", seed=seed)
    dense_state = dense.state_dict()
    with torch.no_grad():
        state = model.state_dict()
        for name in state:
            if name in dense_state:
                state[name].copy_(dense_state[name])
        for block in moe_blocks(model):
            mlp = f"layers.{block.layer}.feed_forward"
            for w in ("w1", "w3", "w2"):  # each expert a copy of the MLP
                getattr(block.experts, w).copy_(dense_state[f"{mlp}.{w}.weight"].expand_as(getattr(block.experts, w)))
            gen = torch.Generator().manual_seed(seed + block.layer)
            block.gate.weight.copy_(torch.randn(block.gate.weight.shape, generator=gen) * router_std)
    return _write_model_checkpoint(model, out, {"model": section, "model_type": model_type}, tokenizer_path,
                                   {"upcycled_from": str(ckpt)})
