"""InternEvo's own checkpoint folders read into a model of any layout: ``ckpt.load_ckpt_info=dict(path=FOLDER,
content=("model",), ckpt_type="internevo")``.

What InternEvo writes (``save_model_checkpoint`` in its ``internlm/checkpoint/components.py``): one ``torch.save``
of a stage's ``state_dict()`` per saving rank, named by the ranks of the groups its tensors are split over:

- ``model_tp{t}_pp{p}.pt``: tensor modes mtp, msp, fsp (every tp rank saves);
- ``model_wp{w}_pp{p}.pt``: isp since InternEvo's 2024-07 re-implementation of its embedding and head (#261);
- ``model_tp{t}_wp{w}_pp{p}.pt``: isp before it (2024-02 to 2024-07; the savers cover every ``t`` and every
  ``w`` but not every pair).

The sizes are known only from the file names. How each tensor is split:

================================================  ========================  =================  ==================
tensor (InternLM2 / Llama names)                   mtp, msp, fsp             isp (model_wp)     isp (model_tp_wp)
================================================  ========================  =================  ==================
``tok_embeddings.weight``                          hidden (dim 1) over tp    hidden over wp     hidden over tp
``tok_embeddings.word_embeddings.weight``          vocab (dim 0) over tp     vocab over wp      vocab over tp
``attention.wqkv`` / ``wq wk wv``, ``w1``, ``w3``  rows (dim 0) over tp      rows over wp       rows over wp
``attention.wo``, ``feed_forward.w2``              columns (dim 1) over tp;  rows over wp       rows over wp
                                                   a bias on tp rank 0 only
``output.weight``                                  rows (dim 0) over tp      rows over wp       rows over tp
norms                                              whole on every rank       whole              whole
================================================  ========================  =================  ==================

An embedding split by vocab under the name ``tok_embeddings.weight`` (``Embedding1D(vocab_parallel=True)``) is
told from one split by hidden by its shards' width against the final norm's.

Stages (``partition_uniform`` in ``internlm/core/parallel/shard.py``): each chunk's layers are split over the
pipeline ranks in rank order, the remainder to the last ranks, and a stage numbers its layers from 0; with
``num_chunks`` > 1 a rank's state dict holds its chunks as ``{c}.model.<name>``. Under the zero-bubble V schedule
(``parallel.pipeline.mode="ZBV"``, two chunks) the second chunk runs down the ranks in reverse, so rank 0 holds the
first and the last layers. Only the training config saved beside the weights (``config_file.pt``, the config
file's text, read with ``ast`` and never run) says which schedule wrote a folder; without it, the stage sizes
decide where they can, and a folder they cannot decide is refused on one line.

InternLM2's ``wqkv`` packs each kv head's query heads, key and value (``evo.model.hf.unpack_wqkv``). Rotary: with
``adapt_hf=False`` in the model section saved beside the weights (``model_config.pt``; InternLM2's default is True,
Llama's False), the q and k rows are in GPT-J pairs, which InternEvo turns into halves at run time; they are
reordered here when that differs from evo's ``qk_interleaved``. With ``norm_head`` the head is saved raw and
normalised row by row in InternEvo's forward: it is loaded normalised (as InternEvo's Hugging Face converter writes
it). Keys may sit under ``model.`` (the AMP wrapper).

Each rank memory-maps the files and builds one whole tensor at a time, copying only its own part into the model.
Not read: FSDP folders (``_dp`` files of ShardedTensors, or DCP files) and MoE experts; both are refused on one
line.
"""

from __future__ import annotations

import pickle
import re
from collections import defaultdict
from pathlib import Path

import torch

from evo.checkpoint import CorruptCheckpointError
from evo.config import PIPELINE_MODE
from evo.errors import CheckpointError
from evo.model.decoder import tied_name
from evo.model.hf import halves_to_interleaved, interleaved_to_halves, unpack_wqkv
from evo.parallel.shards import WholeTensor, fill_parameter

# (file name pattern, the layout it names): "isp-early" is isp as InternEvo saved it from 2024-02 to 2024-07
_FILES = ((re.compile(r"model_tp(?P<tp>\d+)_pp(?P<pp>\d+)\.pt"), "tp"),
          (re.compile(r"model_wp(?P<wp>\d+)_pp(?P<pp>\d+)\.pt"), "isp"),
          (re.compile(r"model_tp(?P<tp>\d+)_wp(?P<wp>\d+)_pp(?P<pp>\d+)\.pt"), "isp-early"))
_KEY = re.compile(r"(?:(\d+)\.)?(?:model\.)?(.*)")  # "{chunk}.model.<name>", "model.<name>" or "<name>"
_LAYER = re.compile(r"layers\.(\d+)\.(.*)")
_ROW_PARALLEL = ("attention.wo.", "feed_forward.w2.")  # split on dim 1 (mtp, msp, fsp); their bias on tp 0
_NORMS = ("attention_norm.", "ffn_norm.", "norm.")


def _first_line(exc: Exception) -> str:
    """An exception's message for a one-line error: its first line (torch's load errors run to several)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _match(name: str) -> tuple[str, tuple[int, int, int]] | None:
    """(layout, (pp, tp, wp) ranks) of a model file's name, or None for another file."""
    for pattern, layout in _FILES:
        m = pattern.fullmatch(name)
        if m:
            ranks = m.groupdict()
            return layout, (int(ranks["pp"]), int(ranks.get("tp") or 0), int(ranks.get("wp") or 0))
    return None


def _shards(folder: Path) -> tuple[dict, str]:
    """{(pp, tp, wp): file} of the model files, and the layout their names give ("tp", "isp" or "isp-early",
    ``_FILES``); one line if they cannot be read."""
    names = sorted(p.name for p in folder.iterdir() if p.name.startswith("model_"))
    if any(n.startswith("model_moe_") for n in names):
        raise CheckpointError(f"InternEvo folder '{folder}' holds MoE experts (model_moe_*.pt), which evo does not "
                              "read")
    fsdp = any(re.fullmatch(r"model_(tp\d+_)?(wp\d+_)?pp\d+_dp\d+\.pt", n) for n in names)
    if fsdp or (not any(_match(n) for n in names) and (folder / ".metadata").is_file()):
        raise CheckpointError(f"InternEvo folder '{folder}' was saved with FSDP ("
                              + ("model_tp*_pp*_dp*.pt, sharded tensors" if fsdp else "DCP files")
                              + "), which evo does not read; save it from InternEvo without FSDP")
    found = {name: _match(name) for name in names}
    found = {name: m for name, m in found.items() if m is not None}
    if not found:
        raise CheckpointError(f"'{folder}' is not an InternEvo checkpoint folder: it has no model_tp*_pp*.pt "
                              "(nor model_wp*_pp*.pt) files")
    layouts = {layout: name for name, (layout, _) in found.items()}
    if len(layouts) > 1:
        raise CheckpointError(f"InternEvo folder '{folder}' mixes model files of different layouts "
                              f"({', '.join(sorted(layouts.values()))}): remove the ones another save left behind")
    (layout,) = layouts
    files = {ranks: folder / name for name, (_, ranks) in found.items()}
    pp, tp, wp = (1 + max(k[i] for k in files) for i in range(3))
    for p in range(pp):
        have = [k for k in files if k[0] == p]
        need_tp = {k[1] for k in have} == set(range(tp))
        need_wp = {k[2] for k in have} == set(range(wp))
        if not (need_tp and need_wp and (layout == "isp-early" or len(have) == tp * wp)):
            lacks = {"tp": f"tp 0..{tp - 1}", "isp": f"wp 0..{wp - 1}",
                     "isp-early": f"tp 0..{tp - 1} and wp 0..{wp - 1}"}[layout]
            raise CheckpointError(f"InternEvo folder '{folder}' is incomplete: pipeline rank {p} lacks some of "
                                  f"{lacks} files")
    return files, layout


def _partition(num_layers: int, pp: int, chunks: int, zbv: bool) -> dict[tuple[int, int], tuple[int, int]]:
    """InternEvo's ``partition_uniform``: {(chunk, pipeline rank): (first layer, layer count)}."""
    out, per_chunk = {}, num_layers // chunks
    for c in range(chunks):
        base, size, left = c * per_chunk, per_chunk // pp, pp - per_chunk % pp
        ranks = range(pp - 1, -1, -1) if zbv and c == 1 else range(pp)
        for i, p in enumerate(ranks):  # the remainder to the ranks that come last in this chunk's order
            n = size + (i >= left)
            out[(c, p)] = (base, n)
            base += n
    return out


def _pipeline_mode(folder: Path) -> str | None:
    """``parallel.pipeline.mode`` of the training config saved beside the weights (``config_file.pt``, the config
    file's text, parsed and never run) of a pipelined folder: "1F1B" where the pipeline section leaves it out
    (InternEvo's default); None without the file, or where the text does not state it plainly: ``parallel``
    assigned once, at the top, as ``dict(...)`` or ``{...}`` with a ``pipeline`` entry of the same kind, its mode a
    string literal or a top-level name bound to one (no star imports, no later changes to ``parallel``)."""
    import ast

    path = folder / "config_file.pt"
    if not path.is_file():
        return None
    try:
        text = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(text, str):
            raise ValueError(f"it holds a {type(text).__name__}, not the config file's text")
        tree = ast.parse(text)
    except Exception as exc:  # noqa: BLE001: any failure to read is one line naming the file
        raise CorruptCheckpointError(f"'{path}' cannot be read as InternEvo's saved config text: "
                                     f"{_first_line(exc)}") from None
    names = {}  # the config's top-level NAME = value assignments
    for node in tree.body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names[target.id] = node.value
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and any(alias.name == "*" for alias in node.names):
            return None  # names from elsewhere
    stores = [node for node in ast.walk(tree) if isinstance(node, (ast.Name, ast.Subscript, ast.Attribute))
              and isinstance(node.ctx, ast.Store)
              and "parallel" in (getattr(node, "id", None), getattr(getattr(node, "value", None), "id", None))]
    top = [t for node in tree.body if isinstance(node, ast.Assign) for t in node.targets]
    if len(stores) != 1 or stores[0] not in top:
        return None  # parallel assigned more than once, in part, or below the top level

    def field(node, key):
        """``key`` of a ``dict(...)`` call or a ``{...}`` literal; ``...`` when absent; None when not told."""
        if isinstance(node, ast.Name):
            node = names.get(node.id)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
            if node.args or any(k.arg is None for k in node.keywords):  # dict(base) or dict(**base): not told here
                return None
            return next((k.value for k in node.keywords if k.arg == key), ...)
        if isinstance(node, ast.Dict):
            if any(k is None for k in node.keys):  # {**base}
                return None
            return next((v for k, v in zip(node.keys, node.values)
                         if isinstance(k, ast.Constant) and k.value == key), ...)
        return None

    pipeline = field(names["parallel"], "pipeline")
    if pipeline is None or pipeline is ...:  # the folder is pipelined: a config without a pipeline is not its own
        return None
    mode = field(pipeline, "mode")
    if mode is ...:
        return "1F1B"
    if isinstance(mode, ast.Name):
        mode = names.get(mode.id)
    return mode.value.upper() if isinstance(mode, ast.Constant) and isinstance(mode.value, str) else None


def is_internevo_folder(folder: str | Path) -> bool:
    return any(_match(p.name) for p in Path(folder).glob("model_*.pt"))


def _saved_section(folder: Path) -> dict | None:
    """The model section of the run that saved ``folder`` (``model_config.pt``), or None if it has none."""
    path = folder / "model_config.pt"
    if not path.is_file():
        return None
    try:
        section = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_ConfigPickle)
    except Exception as exc:  # noqa: BLE001: any failure to read is one line naming the file
        raise CorruptCheckpointError(f"'{path}' cannot be read: {_first_line(exc)}") from None
    if not isinstance(section, dict):
        raise CorruptCheckpointError(f"'{path}' holds a {type(section).__name__}, not a model section")
    return dict(section)


def model_section(folder: str | Path) -> dict:
    """evo's ``model`` section for the InternEvo folder ``folder``: the section InternEvo saved beside the weights
    (evo's field names are InternEvo's; where the section leaves a key out, InternEvo's model default holds:
    ``mlp_ratio`` 4, ``no_bias`` False, no MLP bias ever), with the rotary layout the weights are stored in
    (``qk_interleaved`` is ``not adapt_hf``), the dtype as a string, and the keys that only arrange training
    (num_chunks, checkpoint) or that loading takes care of (norm_head) left out."""
    from dataclasses import fields

    from evo.config import ModelConfig

    folder = Path(folder)
    section = _saved_section(folder)
    if section is None:
        raise CheckpointError(f"InternEvo folder '{folder}' has no model_config.pt to build the model from; build it "
                              "from a config and start with ckpt.load_ckpt_info ckpt_type='internevo'")
    known = {f.name for f in fields(ModelConfig)} - {"num_chunks", "checkpoint", "compile", "norm_head"}
    out = dict(mlp_ratio=4.0, no_bias=False)  # InternEvo's model defaults where they differ from evo's config
    out.update((k, v) for k, v in section.items() if k in known)
    if isinstance(out.get("dtype"), torch.dtype):
        out["dtype"] = str(out["dtype"])
    out["mlp_bias"] = False  # InternEvo's MLP has no bias whatever no_bias says
    # adapt_hf False: q, k rows stored for GPT-J pairs; left out, the model's default (InternLM2 True, Llama False)
    adapt_hf = section["adapt_hf"] if "adapt_hf" in section else _is_internlm2(_Folder(folder))
    out["qk_interleaved"] = not bool(adapt_hf)
    return out


class _Section(dict):
    """Stands in for InternEvo's ``Config`` (a dict) when its pickled model section is read."""

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.update(state)


class _ConfigPickle:
    """``pickle_module`` for ``model_config.pt``: InternEvo's classes become plain dicts, torch's dtypes load as
    themselves, and nothing else can be named, so a folder's pickle cannot run code here."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if module.split(".")[0] == "internlm":
                return _Section
            if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
            if (module, name) in (("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"'{module}.{name}' is not expected in a model section")

    @staticmethod
    def load(file, **kwargs):
        # torch's legacy (non-zip) format reads its first pickles with ``pickle_module.load``: restricted too
        return _ConfigPickle.Unpickler(file, **kwargs).load()


class _Folder:
    """The tensors of an InternEvo folder under their global names (layer indices counted over the stages),
    each rebuilt whole from its shards on demand."""

    def __init__(self, folder: Path):
        self.folder = folder
        files, self.layout = _shards(folder)
        states = {key: self._load(path) for key, path in files.items()}
        counts: dict[tuple[int, int], int] = defaultdict(int)  # layers per (chunk, pipeline rank)
        for (p, _, _), state in states.items():
            for key in state:
                chunk, name = _split(key)
                m = _LAYER.fullmatch(name)
                if m:
                    counts[(chunk, p)] = max(counts[(chunk, p)], int(m[1]) + 1)
        self.num_layers = sum(counts.values())
        offsets = {stage: first for stage, (first, _) in self._stages(counts).items()}
        # global name -> {(tp, wp): (state, key)}
        self.parts: dict[str, dict[tuple[int, int], tuple[dict, str]]] = defaultdict(dict)
        for (p, t, w), state in states.items():
            for key in state:
                chunk, name = _split(key)
                m = _LAYER.fullmatch(name)
                if m:
                    name = f"layers.{offsets[(chunk, p)] + int(m[1])}.{m[2]}"
                self.parts[name][(t, w)] = (state, key)

    def _stages(self, counts: dict[tuple[int, int], int]) -> dict[tuple[int, int], tuple[int, int]]:
        """{(chunk, pipeline rank): (first layer, layer count)}: where each stage's layers sit in the model. The
        chunks run in rank order, except the second chunk of the zero-bubble V schedule, which runs back down."""
        pp = 1 + max((p for _, p in counts), default=0)
        chunks = 1 + max((c for c, _ in counts), default=0)

        def layout(zbv: bool) -> dict:
            order = sorted(counts, key=lambda s: (s[0], -s[1] if zbv and s[0] == 1 else s[1]))
            out, first = {}, 0
            for stage in order:
                out[stage] = (first, counts[stage])
                first += counts[stage]
            return out

        if chunks != 2 or pp == 1:
            return layout(False)
        fits = [zbv for zbv in (False, True)
                if {s: n for s, (_, n) in _partition(self.num_layers, pp, chunks, zbv).items()} == dict(counts)]
        if not fits:
            raise CheckpointError(f"InternEvo folder '{self.folder}' holds stages of {dict(sorted(counts.items()))} "
                                  "layers per (chunk, pipeline rank), which InternEvo's partition_uniform gives to "
                                  "neither the interleaved nor the zero-bubble V schedule: evo cannot place them")
        mode = _pipeline_mode(self.folder)
        if mode is not None:
            v_shape = mode in PIPELINE_MODE and PIPELINE_MODE[mode].v_shape  # InternEvo's other modes: not a V
            if v_shape not in fits:
                raise CheckpointError(f"InternEvo folder '{self.folder}': its config_file.pt says pipeline mode "
                                      f"{mode!r}, and its stage sizes are those of the other schedule")
            return layout(v_shape)
        if len(fits) == 1:
            return layout(fits[0])
        raise CheckpointError(
            f"InternEvo folder '{self.folder}' holds two chunks per pipeline rank, and neither its config_file.pt "
            "(absent, or not stating parallel.pipeline.mode as a literal) nor the stage sizes say whether the "
            "zero-bubble V schedule (mode \"ZBV\": the second chunk on the ranks in reverse) or the interleaved one "
            "wrote it: put the run's config file text in config_file.pt (torch.save of a str, as InternEvo does)")

    def _load(self, path: Path) -> dict:
        try:
            try:
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError as exc:  # torch's legacy (pre-zip) format cannot be memory-mapped
                if "mmap" not in str(exc):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001: any failure to read is one line naming the file
            raise CorruptCheckpointError(f"'{path}' cannot be read (truncated or corrupt?): "
                                         f"{_first_line(exc)}") from None
        if not isinstance(state, dict):
            raise CorruptCheckpointError(f"'{path}' holds a {type(state).__name__}, not a model state dict")
        return state

    def __contains__(self, name: str) -> bool:
        return name in self.parts

    def whole(self, name: str) -> torch.Tensor:
        """The full tensor ``name``: its shards put together as the table in the module docstring says."""
        parts = self.parts[name]  # {(tp rank, wp rank): (state, key)}
        isp = self.layout != "tp"
        if name.startswith(("tok_embeddings.", "output.")):  # over the group the file names give
            over, dim = (1 if self.layout == "isp" else 0), 0
            if name == "tok_embeddings.weight":  # hidden split, unless its shards are as wide as the model
                state, key = next(iter(parts.values()))
                split = len({index[over] for index in parts}) > 1
                dim = 0 if split and state[key].shape[1] == self._hidden_size() else 1
        elif name.startswith("layers.") and not name.split(".", 2)[2].startswith(_NORMS):
            row = name.split(".", 2)[2].startswith(_ROW_PARALLEL) and not isp
            over, dim = (1, 0) if isp else (0, 1 if row else 0)
            if row and name.endswith(".bias"):  # a row-parallel layer's bias lives on tp rank 0 only
                state, key = parts[min(parts)]
                return state[key]
        else:  # norms: whole on every rank
            state, key = next(iter(parts.values()))
            return state[key]
        shards = {}  # one shard per rank of the group it is split over, whichever file holds it
        for index, (state, key) in sorted(parts.items()):
            shards.setdefault(index[over], state[key])
        return torch.cat([shards[i] for i in sorted(shards)], dim=dim)

    def _hidden_size(self) -> int | None:
        norm = self.parts.get("norm.weight")
        if not norm:
            return None
        state, key = next(iter(norm.values()))
        return state[key].shape[0]


def _is_internlm2(source: _Folder) -> bool:
    """InternLM2 packs q, k, v into one wqkv; Llama keeps them apart."""
    return any(name.endswith("attention.wqkv.weight") for name in source.parts)


def _split(key: str) -> tuple[int, str]:
    m = _KEY.fullmatch(key)
    return int(m[1] or 0), m[2]


def _source_key(name: str, cfg, internlm2: bool, source: _Folder) -> str:
    """The folder's name of the tensor evo's parameter ``name`` is read from."""
    module, kind = name.rsplit(".", 2)[-2:]
    name = tied_name(name, cfg.tie_word_embeddings)
    if internlm2 and module in ("wq", "wk", "wv"):
        return f"{name.rsplit('.', 2)[0]}.wqkv.{kind}"
    if name == "tok_embeddings.weight" and name not in source:
        return "tok_embeddings.word_embeddings.weight"  # flash-attn's ParallelGPT2Embeddings
    return name


def internevo_tensors(folder: str | Path, cfg, names: list[str]):
    """(evo name, the folder's name, whole tensor) for each of ``names`` (evo parameter names of model config
    ``cfg``), read from the InternEvo checkpoint ``folder`` one at a time: wqkv unpacked, q and k rows in
    ``cfg``'s rotary layout, a ``norm_head`` head normalised. The folder must describe the model's own shapes:
    before anything is yielded, the layer count and the tensors the model has no place for (a bias, say) are
    checked; a tensor missing is named when its turn comes."""
    from evo.model import build_model

    folder = Path(folder)
    source = _Folder(folder)
    where = f"InternEvo folder '{folder}'"
    if source.num_layers != cfg.num_layers:
        raise CheckpointError(f"{where} does not fit this model: it holds {source.num_layers} layers and "
                              f"model.num_layers is {cfg.num_layers}")
    internlm2 = _is_internlm2(source)
    wanted = {_source_key(n, cfg, internlm2, source) for n, _ in build_model(cfg, "meta").named_parameters()}
    extra = sorted(set(source.parts) - wanted)
    if extra:
        raise CheckpointError(f"{where} does not fit this model: it holds {', '.join(map(repr, extra[:3]))}"
                              f"{' and more' if len(extra) > 3 else ''}, which this model has no place for (check "
                              "model.no_bias, qkv_bias, o_bias, mlp_bias)")
    saved = _saved_section(folder) or {}
    pairs = not saved.get("adapt_hf", internlm2)  # q, k rows stored for GPT-J pairs (model_section's rule)
    reorder = None
    if pairs != bool(cfg.qk_interleaved):
        reorder = interleaved_to_halves if pairs else halves_to_interleaved
    unpacked: dict[str, tuple] = {}  # InternLM2: the layer's wqkv being read, split into its q, k, v parts
    for name in names:
        module = name.rsplit(".", 2)[-2]
        key = _source_key(name, cfg, internlm2, source)
        if key not in source:
            raise CheckpointError(f"{where} does not fit this model: it has no '{key}'"
                                  + (f" (for '{name}')" if key != name else ""))
        if key.endswith((".wqkv.weight", ".wqkv.bias")):
            if key not in unpacked:
                unpacked = {key: unpack_wqkv(source.whole(key), cfg.num_attention_heads, cfg.kv_heads, cfg.head_dim)}
            tensor = unpacked[key][("wq", "wk", "wv").index(module)]
        else:
            tensor = source.whole(key)
        if reorder is not None and module in ("wq", "wk"):
            tensor = reorder(tensor, cfg.head_dim)
        if key == "output.weight" and saved.get("norm_head"):
            tensor = torch.nn.functional.normalize(tensor.float(), dim=-1).to(tensor.dtype)
        yield name, key, tensor


@torch.no_grad()
def load_internevo_weights(model: torch.nn.Module, folder: str | Path) -> None:
    """Fill ``model``'s parameters (a plain model, or any layout's: each rank copies its part) from the InternEvo
    checkpoint ``folder`` (InternLM2 or Llama, saved under any tp, pp, isp and num_chunks without FSDP); what does
    not fit is one line (``internevo_tensors``)."""
    params = dict(model.named_parameters())
    for name, key, tensor in internevo_tensors(folder, model.cfg, list(params)):
        fill_parameter(params[name], WholeTensor(tensor), f"InternEvo folder '{folder}'", key)
