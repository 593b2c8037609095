"""Samplers and loaders over packed rows, and the builders the training script calls.

A training step consumes one global batch of ``dp_size * micro_num`` packed rows; data-parallel
rank k takes rows ``[k * micro_num, (k + 1) * micro_num)`` of it. Which rows make up step s depends
only on ``data.seed`` and the global batch, never on how rows are split across ranks. Rows are
visited in a fresh seeded permutation each epoch. The loader's state (rows consumed, batches
yielded) goes into every checkpoint, so a resumed run sees exactly the batches an uninterrupted
one would.
"""

from __future__ import annotations

import warnings
from typing import Iterator

import numpy as np

from evo.config import DataConfig, parse_skip_batches
from evo.data.builtin import builtin_corpus, dummy_corpus
from evo.data.packing import Batch, PackedRows, UnpackedRows, collate, split_documents
from evo.data.tokenized import find_types, tokenized_corpus
from evo.data.tokenizer import load_tokenizer
from evo.errors import ConfigError, DataError
from evo.parallel.context import ParallelContext

class TrainLoader:
    """Endless iterator of this rank's share of each global batch, resumable through ``state_dict``."""

    def __init__(self, rows: PackedRows, micro_num: int, ctx: ParallelContext, seed: int, skip_batches: str = "",
                 tokenizer=None):
        if len(rows) == 0:
            raise DataError(f"the training data holds fewer tokens than one packed row ({rows.length} tokens)")
        self.rows, self.micro_num, self.seed = rows, micro_num, seed
        self.dp_size, self.dp_rank = ctx.dp_size, ctx.dp_rank
        self.skip = parse_skip_batches(skip_batches)
        self.tokenizer = tokenizer
        self.rows_consumed = 0  # global rows, over all ranks
        self.batch_index = 0
        self._perm_epoch, self._perm = -1, None

    @property
    def global_batch_rows(self) -> int:
        return self.dp_size * self.micro_num

    def _row_at(self, position: int) -> int:
        epoch, i = divmod(position, len(self.rows))
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
            self._perm_epoch = epoch
        return int(self._perm[i])

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        while True:
            start = self.rows_consumed + self.dp_rank * self.micro_num
            index = self.batch_index
            self.rows_consumed += self.global_batch_rows
            self.batch_index += 1
            if index not in self.skip:
                return collate([self.rows[self._row_at(start + i)] for i in range(self.micro_num)])

    def state_dict(self) -> dict:
        return {"rows_consumed": self.rows_consumed, "batch_index": self.batch_index,
                "global_batch_rows": self.global_batch_rows, "num_rows": len(self.rows), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["num_rows"] != len(self.rows) or state["seed"] != self.seed:
            raise DataError(f"the checkpoint's data position is for {state['num_rows']} rows with seed {state['seed']}; "
                            f"this run has {len(self.rows)} rows with seed {self.seed} (changed data or data.seed?)")
        if state["global_batch_rows"] != self.global_batch_rows:
            warnings.warn(f"global batch changed from {state['global_batch_rows']} to {self.global_batch_rows} rows; "
                          "continuing from the same position in the data")
        self.rows_consumed, self.batch_index = state["rows_consumed"], state["batch_index"]


class ValidLoader:
    """One pass over a validation set in order, ``micro_num`` rows per batch per rank."""

    def __init__(self, rows: PackedRows, micro_num: int, ctx: ParallelContext, max_batches: int | None = None):
        self.rows, self.micro_num = rows, micro_num
        self.dp_size, self.dp_rank = ctx.dp_size, ctx.dp_rank
        self.num_batches = len(rows) // (micro_num * self.dp_size)
        if max_batches is not None:
            self.num_batches = min(self.num_batches, max_batches)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        g = self.micro_num * self.dp_size
        for b in range(self.num_batches):
            start = b * g + self.dp_rank * self.micro_num
            yield collate([self.rows[start + i] for i in range(self.micro_num)])


def _check_vocab(tokenizer, vocab_size: int) -> None:
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"'model.vocab_size' ({vocab_size}) is smaller than the tokenizer's vocabulary "
                          f"({tokenizer.vocab_size}, {tokenizer.name})")


def _unsupported(cfg: DataConfig):
    return ConfigError(f"data.type '{cfg.type}' is not available in this version of evo; use 'tokenized', 'builtin' "
                       "or 'dummy'")


def _dummy(cfg: DataConfig, vocab_size: int):
    return dummy_corpus(cfg.num_dummy_samples, cfg.seq_len, vocab_size, cfg.seed, cfg.min_length)


def _tokenized(cfg: DataConfig, found, vocab_size: int):
    return tokenized_corpus(found, cfg.min_length, vocab_size, f"data.train_folder '{cfg.train_folder}'")


def _held_out(cfg: DataConfig, corpus):
    """(what is trained on, what is held out for validation): ``data.valid_split`` of the documents, chosen by
    ``data.seed``; with no split, the whole corpus and nothing."""
    if cfg.valid_split <= 0:
        return corpus, None
    return split_documents(corpus, cfg.valid_split, cfg.seed)


def _rows(corpus, cfg: DataConfig):
    if not cfg.use_packed_dataset:
        return UnpackedRows(corpus, cfg.seq_len, cfg.micro_bsz)
    return PackedRows(corpus, cfg.seq_len, cfg.micro_bsz, cfg.pack_sample_into_one)


def build_train_loader(cfg: DataConfig, ctx: ParallelContext, vocab_size: int) -> tuple[TrainLoader, list[str]]:
    """The training loader for ``cfg.type`` and the dataset type names (index = type id)."""
    tokenizer = None
    if cfg.type == "dummy":
        corpus, types = _held_out(cfg, _dummy(cfg, vocab_size))[0], ["dummy"]
    elif cfg.type == "builtin":
        tokenizer = load_tokenizer(cfg.tokenizer_path)
        _check_vocab(tokenizer, vocab_size)
        corpus, types = builtin_corpus("train", tokenizer, cfg.min_length), ["python"]
    elif cfg.type == "streaming":
        from evo.data.streaming import StreamingLoader

        tokenizer = load_tokenizer(cfg.tokenizer_path)
        _check_vocab(tokenizer, vocab_size)
        loader = StreamingLoader(cfg, ctx, tokenizer)
        return loader, loader.type_names
    elif cfg.type == "tokenized":
        found = find_types(cfg.train_folder)
        corpus = _held_out(cfg, _tokenized(cfg, found, vocab_size))[0]
        types = [name for name, _ in found]
        if cfg.tokenizer_path:
            tokenizer = load_tokenizer(cfg.tokenizer_path)
    else:
        raise _unsupported(cfg)
    rows = _rows(corpus, cfg)
    return TrainLoader(rows, cfg.micro_num, ctx, cfg.seed, cfg.skip_batches, tokenizer), types


def build_valid_loaders(cfg: DataConfig, ctx: ParallelContext, vocab_size: int) -> dict[str, ValidLoader]:
    """Validation sets by name: the built-in corpus has one ('python'); a tokenized ``valid_folder`` one per
    subfolder; dummy data has none."""
    sets = {}
    if cfg.valid_split > 0:  # documents of the training data held out (never trained on)
        whole = _dummy(cfg, vocab_size) if cfg.type == "dummy" else _tokenized(cfg, find_types(cfg.train_folder),
                                                                                vocab_size)
        sets["valid"] = _held_out(cfg, whole)[1]
    elif cfg.type == "builtin":
        sets["python"] = builtin_corpus("valid", load_tokenizer(cfg.tokenizer_path), cfg.min_length)
    elif cfg.type in ("tokenized", "streaming") and cfg.valid_folder:
        for name, paths in find_types(cfg.valid_folder):
            sets[name] = tokenized_corpus([(name, paths)], cfg.min_length, vocab_size,
                                          f"data.valid_folder '{cfg.valid_folder}' ({name})")
    elif cfg.type not in ("dummy", "tokenized", "streaming"):  # streaming: validation comes from valid_folder
        raise _unsupported(cfg)
    loaders = {name: ValidLoader(_rows(corpus, cfg), cfg.valid_micro_num, ctx, cfg.valid_max_batches)
               for name, corpus in sets.items()}
    return {name: loader for name, loader in loaders.items() if len(loader)}
