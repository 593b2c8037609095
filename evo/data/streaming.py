"""Streaming data: ``.jsonl`` files tokenized on the fly, packed like the indexed data.

Documents are read in order (files sorted; each first-level subfolder of ``train_folder`` is a
dataset type, as for the tokenized format; or the rows of a Hugging Face ``datasets`` dataset saved
with ``save_to_disk``, when that package is installed) and document i goes to data-parallel rank
i % dp_size, so the ranks read disjoint shares. Each rank packs its share into rows exactly as
``PackedRows`` does, from a small buffer of the documents not yet emitted. The loader's state (file,
byte offset, document counter, epoch and that buffer) goes into every checkpoint, so a resumed run
with the same data-parallel size continues where it stopped. At the end of the files a new epoch
starts from the first one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from evo.config import DataConfig, parse_skip_batches
from evo.data.packing import Batch, Corpus, PackedRows, collate
from evo.data.tokenized import find_types
from evo.errors import DataError
from evo.monitor import logger
from evo.parallel.context import ParallelContext


_EPOCH_END = object()  # returned by _read when the data is exhausted and a new epoch begins


class StreamingLoader:
    def __init__(self, cfg: DataConfig, ctx: ParallelContext, tokenizer, text_key: str = "text"):
        if tokenizer.eos_id is None:
            raise DataError(f"tokenizer '{tokenizer.name}' has no end-of-sequence token")
        self.cfg, self.tokenizer, self.text_key = cfg, tokenizer, text_key
        self.dp_size, self.dp_rank = ctx.dp_size, ctx.dp_rank
        self.length = cfg.seq_len * cfg.micro_bsz
        self.skip = parse_skip_batches(cfg.skip_batches)
        self.hf = _hf_dataset(Path(cfg.train_folder))
        if self.hf is not None:  # one type; the position is a row index ("offset")
            self.types, self.files = [(Path(cfg.train_folder).name, [])], []
        else:
            self.types = find_types(cfg.train_folder, ".jsonl", "data.type='streaming'")
            self.files = [(path, t) for t, (_, paths) in enumerate(self.types) for path in paths]
        self.is_main = ctx.is_main
        # line: lines read in the current file (for file:line in messages); bad_lines: malformed lines skipped
        self.state = {"file": 0, "offset": 0, "line": 0, "doc": 0, "epoch": 0, "buffer": [], "batch_index": 0,
                      "dp_size": self.dp_size, "bad_lines": 0}

    @property
    def type_names(self) -> list[str]:
        return [name for name, _ in self.types]

    def _read(self):
        """The next document's text and type id, advancing the position (``_EPOCH_END`` at the end of the
        data; None for a line to skip: blank, or malformed and allowed by ``data.max_bad_lines``)."""
        s = self.state
        if self.hf is not None:
            if s["offset"] >= len(self.hf):
                s.update(offset=0, epoch=s["epoch"] + 1)
                return _EPOCH_END, 0
            s["offset"] += 1
            return self._text(self.hf[s["offset"] - 1], f"'{self.cfg.train_folder}' row {s['offset'] - 1}", "record", 0)
        while s["file"] < len(self.files):
            path, type_id = self.files[s["file"]]
            with open(path, "rb") as f:
                f.seek(s["offset"])
                line = f.readline()
            if line:
                s["offset"] += len(line)
                s["line"] += 1
                if not line.strip():
                    return None, type_id  # a blank line holds no document
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    return self._bad(f"{path}:{s['line']}", f"not JSON ({exc})")
                return self._text(record, f"{path}:{s['line']}", "JSON object", type_id)
            s.update(file=s["file"] + 1, offset=0, line=0)
        s.update(file=0, offset=0, line=0, epoch=s["epoch"] + 1)
        return _EPOCH_END, 0

    def _text(self, record, where: str, kind: str, type_id: int):
        """(the document's text, type_id) from a record (a ``kind``: JSON object, dataset record), which must hold
        a string under text_key; else a bad line."""
        text = record.get(self.text_key) if isinstance(record, dict) else None
        if not isinstance(text, str):
            return self._bad(where, f"not a {kind} with a string under '{self.text_key}'")
        return text, type_id

    def _bad(self, where: str, why: str):
        """A malformed line: an error, unless ``data.max_bad_lines`` allows skipping it. Counted in the first
        epoch only (later epochs meet the same lines again); every rank reads every line, so all count alike."""
        s, allowed = self.state, self.cfg.max_bad_lines
        if s["epoch"] == 0:
            s["bad_lines"] += 1
            if s["bad_lines"] > allowed:
                raise DataError(f"{where}: {why} (bad line {s['bad_lines']}, data.max_bad_lines={allowed}: raise it "
                                "to skip such lines, or fix the data)")
            if self.is_main:
                logger.warning("data: skipped %s: %s (bad line %d of data.max_bad_lines=%d)", where, why,
                               s["bad_lines"], allowed)
        return None, 0

    def _next_document(self):
        """The next document of this rank's share: (tokens, type id)."""
        s = self.state
        dry_wraps = 0  # passes over all the data without a document for this rank
        while True:
            text, type_id = self._read()
            if text is _EPOCH_END:
                dry_wraps += 1
                if dry_wraps == 2:
                    err = DataError(f"'{self.cfg.train_folder}' holds no document for data-parallel rank "
                                    f"{self.dp_rank} (a record with a string under '{self.text_key}' of at least "
                                    f"data.min_length={self.cfg.min_length} tokens)")
                    err.every_rank = True  # a rank-specific error: the CLI prints it on whichever rank meets it
                    raise err
                continue
            if text is None:
                continue
            mine = s["doc"] % self.dp_size == self.dp_rank
            s["doc"] += 1
            if not mine:
                continue
            tokens = self.tokenizer.encode(text) + [self.tokenizer.eos_id]
            if len(tokens) < max(self.cfg.min_length, 1):
                continue
            return tokens, type_id

    def _next_row(self) -> dict:
        buffer = self.state["buffer"]  # [[tokens, type id], ...]: what is not yet emitted
        while sum(len(t) for t, _ in buffer) < self.length + 1:
            buffer.append(list(self._next_document()))
        corpus = Corpus.from_documents([t for t, _ in buffer], [ty for _, ty in buffer])
        row = PackedRows(corpus, self.cfg.seq_len, self.cfg.micro_bsz, self.cfg.pack_sample_into_one)[0]
        # drop the emitted tokens: whole documents, and the head of the one the row cut
        left = self.length
        while left:
            if len(buffer[0][0]) <= left:
                left -= len(buffer.pop(0)[0])
            else:
                buffer[0][0] = buffer[0][0][left:]
                left = 0
        return row

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        while True:
            rows = [self._next_row() for _ in range(self.cfg.micro_num)]
            index = self.state["batch_index"]
            self.state["batch_index"] += 1
            if index not in self.skip:
                return collate(rows)

    def state_dict(self) -> dict:
        return json.loads(json.dumps(self.state))  # a deep copy of plain data

    def load_state_dict(self, state: dict) -> None:
        if state["dp_size"] != self.dp_size:
            raise DataError(f"this streaming checkpoint was written with {state['dp_size']} data-parallel ranks; "
                            f"resume it with the same number (now {self.dp_size})")
        state = json.loads(json.dumps(state))
        state.setdefault("bad_lines", 0)
        if "line" not in state:  # a checkpoint from before line numbers: count them up to the offset
            state["line"] = 0
            if self.hf is None and state["file"] < len(self.files):
                with open(self.files[state["file"]][0], "rb") as f:
                    state["line"] = f.read(state["offset"]).count(b"\n")
        self.state = state


def _hf_dataset(folder: Path):
    """A Hugging Face ``datasets`` dataset saved with ``save_to_disk`` (its "train" split if it is a dict),
    or None when ``folder`` is not one."""
    if not ((folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file()):
        return None
    try:
        import datasets
    except ImportError:
        raise DataError(f"'{folder}' is a Hugging Face datasets folder: pip install datasets to stream it") from None
    ds = datasets.load_from_disk(str(folder))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[sorted(ds)[0]]
    return ds
