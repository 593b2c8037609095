"""Folders of weights: what a folder is, the model it holds, and loading its weights into a model of any layout.

Three kinds (``FOLDER_KINDS``):
- ``evo``: an evo checkpoint (``evo.checkpoint``), or a folder of them (the newest complete one is meant);
- ``hf``: a transformers folder of one of ``evo.model.hf.FAMILIES`` or InternLM2 (config.json with a
  ``model_type``, safetensors): each rank reads from the files only the part of each tensor it holds
  (``safe_open(...).get_slice``), so no process ever holds the whole model (a MoE layer's experts, saved one by
  one, are stacked into evo's 3-D weight a layer at a time);
- ``internevo``: an InternEvo checkpoint folder (``evo.internevo``).
``open_folder(path)`` says which and reads its model config; ``load_weights(model, folder)`` fills a model of
any layout (DTensor shards, pipeline stages) from it; ``load_model(path)`` builds the model in one process. The
trainer (``ckpt.load_ckpt_info`` with a ``ckpt_type``), ``evo.convert`` and ``scripts/generate.py`` open folders
here. Reading a folder never runs code from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from evo.checkpoint import (TRAIN_STATE, SafeReader, checkpoint_model_config, load_checkpoint, read_train_state,
                            resolve_checkpoint)
from evo.config import ModelConfig, model_config
from evo.errors import CheckpointError
from evo.internevo import is_internevo_folder, load_internevo_weights
from evo.internevo import model_section as internevo_model_section
from evo.model import build_model
from evo.model.decoder import tied_name
from evo.model.hf import (FAMILIES, INTERNLM2, MOE_FAMILIES, hf_moe_names, hf_name, internlm2_name, model_config_from_hf,
                          model_config_from_internlm2, unpack_wqkv)
from evo.parallel.shards import WholeTensor, fill_parameter

FOLDER_KINDS = ("evo", "hf", "internevo")
_DTYPES = {"float32": "torch.float32", "bfloat16": "torch.bfloat16", "float16": "torch.float16"}  # transformers'


@dataclass
class WeightsFolder:
    kind: str  # one of FOLDER_KINDS
    path: Path  # for "evo", the checkpoint itself (the newest complete one of a folder of them)
    model: ModelConfig  # the model it holds
    tokenizer_path: str | None  # the tokenizer it was trained with or ships; None when unknown


def folder_kind(path: str | Path) -> str:
    """Which of ``FOLDER_KINDS`` ``path`` is: ``hf`` when it holds a transformers config.json (a ``model_type``,
    and no DCP metadata beside it), ``internevo`` when it holds InternEvo's model files, else ``evo``."""
    folder = Path(path)
    config = folder / "config.json"
    if config.is_file() and not (folder / ".metadata").is_file():
        try:
            if "model_type" in json.loads(config.read_text()):
                return "hf"
        except (OSError, ValueError):
            pass  # not a transformers config: read below as what else it may be
    return "internevo" if folder.is_dir() and is_internevo_folder(folder) else "evo"


def open_folder(path: str | Path, kind: str | None = None) -> WeightsFolder:
    """The folder at ``path`` (of ``kind``, or detected by ``folder_kind``) with its model config."""
    kind = kind or folder_kind(path)
    folder = Path(path)
    if kind == "evo":
        folder = resolve_checkpoint(folder)
        read_train_state(folder / TRAIN_STATE)  # vetted: a train state that would run code is refused here
        SafeReader(folder).read_metadata()  # ... and so is DCP's metadata
        cfg, tokenizer_path = checkpoint_model_config(folder)
        return WeightsFolder(kind, folder, cfg, tokenizer_path)
    section = read_hf_config(folder)[1] if kind == "hf" else internevo_model_section(folder)
    tokenizer_path = str(folder / "tokenizer.json") if (folder / "tokenizer.json").is_file() else None
    return WeightsFolder(kind, folder, model_config(section), tokenizer_path)


def load_weights(model: torch.nn.Module, folder: WeightsFolder | str | Path, kind: str | None = None) -> None:
    """Fill ``model``'s parameters (any layout: each rank copies only its part of each tensor) from ``folder``
    (a ``WeightsFolder``, or a path of ``kind`` or of the kind detected)."""
    path, kind = (folder.path, folder.kind) if isinstance(folder, WeightsFolder) else (Path(folder), kind)
    kind = kind or folder_kind(path)
    if kind == "hf":
        load_hf_weights(model, path)
    elif kind == "internevo":
        load_internevo_weights(model, path)
    else:
        load_checkpoint(resolve_checkpoint(path), {"model": model.state_dict()})


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
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = open_folder(path)
    cfg = folder.model
    if dtype is not None:
        cfg = model_config({**model_fields(cfg), "dtype": str(dtype) if not isinstance(dtype, str) else dtype})
    model = build_model(cfg, device)
    load_weights(model, folder)
    return model.eval(), folder.tokenizer_path


def model_fields(cfg) -> dict:
    """A ModelConfig's fields as a ``model`` section again (the derived ones left to be derived)."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in cfg.derived}


# ---------------------------------------------------------------------------------------------- Hugging Face
def read_hf_config(hf_dir: str | Path) -> tuple[dict, dict]:
    """(transformers config.json, evo's model section for it), or one line saying why the folder cannot be used."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise CheckpointError(f"'{hf_dir}' is not a Hugging Face model folder: it has no config.json")
    config = json.loads((hf_dir / "config.json").read_text())
    family = config.get("model_type")
    if family not in (*FAMILIES, INTERNLM2):
        arch = ", ".join(config.get("architectures") or []) or "no architectures"
        raise CheckpointError(f"'{hf_dir}' holds a '{family}' model ({arch}); evo reads {', '.join(FAMILIES)} and "
                              f"{INTERNLM2} (Llama 2 and 3, Mistral, Qwen2, Qwen3, InternLM2, and the mixtures of "
                              "experts Qwen3-MoE, Mixtral, Qwen2-MoE)")
    try:
        section = model_config_from_internlm2(config) if family == INTERNLM2 else model_config_from_hf(config)
    except ValueError as exc:
        raise CheckpointError(f"'{hf_dir}': {exc}") from None
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    section["dtype"] = _DTYPES.get(str(dtype).replace("torch.", ""), "torch.float32")
    return config, section


def _hf_files(hf_dir: Path) -> dict[str, Path]:
    """Hugging Face tensor name -> the safetensors file holding it."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: hf_dir / file for name, file in weight_map.items()}
    single = hf_dir / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"'{hf_dir}' has no model.safetensors (nor model.safetensors.index.json)")
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return {name: single for name in f.keys()}


def _hf_name(evo_name: str, tied: bool) -> str:
    return hf_name(tied_name(evo_name, tied))


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, hf_dir: str | Path) -> None:
    """Fill ``model``'s parameters (a plain model, or any layout's: DTensor shards, pipeline stages) from the
    transformers folder ``hf_dir``, each rank reading only its part of each tensor. The folder must describe the
    model's own shapes: the first tensor that is missing or shaped otherwise is named on one line."""
    from safetensors import safe_open

    hf_dir = Path(hf_dir)
    config, _ = read_hf_config(hf_dir)
    internlm2 = config["model_type"] == INTERNLM2
    moe_family = config["model_type"] if config["model_type"] in MOE_FAMILIES else None
    files = _hf_files(hf_dir)
    cfg = model.cfg
    tied = bool(cfg.tie_word_embeddings)
    handles: dict[Path, object] = {}

    def open_slice(key: str, name: str):
        if key not in files:
            raise CheckpointError(f"Hugging Face folder '{hf_dir}' does not fit this model: it has no '{key}' "
                                  f"(for '{name}')")
        if files[key] not in handles:
            handles[files[key]] = safe_open(str(files[key]), "pt")
        return handles[files[key]].get_slice(key)

    unpacked: dict[str, tuple] = {}  # InternLM2: the wqkv being read, split into its q, k, v parts
    try:
        for name, p in model.named_parameters():
            module, kind = name.rsplit(".", 2)[-2:]
            moe_keys = hf_moe_names(name, moe_family, cfg.num_experts) if moe_family else None
            if moe_keys is not None and ".experts." in name:  # one tensor per expert, stacked: (E, ...)
                key = moe_keys[0]
                source = WholeTensor(torch.stack([open_slice(k, name)[:] for k in moe_keys]))
            elif moe_keys is not None:
                key = moe_keys[0]
                source = open_slice(key, name)
            elif internlm2 and module in ("wq", "wk", "wv"):  # one part of the layer's packed wqkv, whole
                key = f"model.{name.rsplit('.', 2)[0]}.wqkv.{kind}"
                if key not in unpacked:
                    unpacked = {key: unpack_wqkv(open_slice(key, name)[:], cfg.num_attention_heads, cfg.kv_heads,
                                                 cfg.head_dim)}
                source = WholeTensor(unpacked[key][("wq", "wk", "wv").index(module)])
            else:
                if internlm2:
                    key = internlm2_name(tied_name(name, tied))
                else:
                    key = _hf_name(name, tied)
                source = open_slice(key, name)
            fill_parameter(p, source, f"Hugging Face folder '{hf_dir}'", key)
    finally:
        handles.clear()
