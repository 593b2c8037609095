"""InternEvo's packing: documents concatenated into rows of ``seq_len * micro_bsz`` tokens.

A corpus is one flat token array with document boundaries. Row r is the stream slice
``[r * L, (r + 1) * L)`` (L = seq_len * micro_bsz): documents are cut at row ends, and the last label
of a row is the true next token when its document goes on in the next row. Inside a row,
``cu_seqlens`` has a boundary at every document start and, within a document, every ``seq_len``
tokens (so no attention span exceeds seq_len); ``indexes`` restart at each boundary. Labels are the
next token, and -100 at each document's last token and before a negative (input-only) token, whose
absolute value is the input, as in InternEvo's SFT data. With ``pack_sample_into_one`` the
boundaries are fixed every seq_len and documents are ignored for attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from evo.errors import DataError
from evo.model.flops import seqlen_sq

IGNORE_INDEX = -100

Batch = tuple[dict, torch.Tensor]  # ({input_ids, cu_seqlens, indexes, type_ids}, labels): what collate makes


def collate(rows: list[dict]) -> Batch:
    """Rows -> InternEvo's packed batch: ({input_ids, cu_seqlens, indexes, type_ids}, labels).

    input_ids, indexes, type_ids and labels are (rows, L) int64; cu_seqlens is a list of int32 (n_i + 1,).
    """
    stack = lambda key: torch.from_numpy(np.stack([r[key] for r in rows]))  # noqa: E731
    batch = {"input_ids": stack("input_ids"), "cu_seqlens": [torch.from_numpy(r["cu_seqlens"]) for r in rows],
             "indexes": stack("indexes"), "type_ids": stack("type_ids")}
    return batch, stack("labels")


@dataclass
class Corpus:
    """Documents as one stream: tokens (N,) int32, offsets (docs + 1,) int64, doc_types (docs,) int32."""

    tokens: np.ndarray
    offsets: np.ndarray
    doc_types: np.ndarray

    @classmethod
    def from_documents(cls, docs: list, type_ids: list[int] | int = 0, min_length: int = 0) -> "Corpus":
        docs = [np.asarray(d, dtype=np.int32) for d in docs]
        types = [type_ids] * len(docs) if isinstance(type_ids, int) else list(type_ids)
        keep = [i for i, d in enumerate(docs) if len(d) >= max(min_length, 1)]
        lengths = np.array([len(docs[i]) for i in keep], dtype=np.int64)
        offsets = np.zeros(len(keep) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.concatenate([docs[i] for i in keep]) if keep else np.zeros(0, np.int32)
        return cls(tokens, offsets, np.array([types[i] for i in keep], dtype=np.int32))

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Stream positions [start, stop) as int64 (negative ids kept: they mark input-only tokens)."""
        return self.tokens[start:stop].astype(np.int64)


class DocumentSubset:
    """Some documents of a corpus (``docs``: ascending indices) as a corpus of their own, in the same order; a view
    over the corpus (nothing copied), with the ``offsets``, ``doc_types``, ``num_tokens`` and ``slice`` that
    ``PackedRows`` reads."""

    def __init__(self, corpus, docs):
        self.corpus, self.docs = corpus, np.asarray(docs, dtype=np.int64)
        offsets = np.asarray(corpus.offsets)
        self.starts = offsets[self.docs]
        self.offsets = np.zeros(len(self.docs) + 1, dtype=np.int64)
        np.cumsum(offsets[self.docs + 1] - self.starts, out=self.offsets[1:])
        self.doc_types = np.asarray(corpus.doc_types)[self.docs]

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Stream positions [start, stop) of the subset, read from its documents in the corpus."""
        parts, pos = [], start
        d = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while pos < stop:
            end = min(stop, int(self.offsets[d + 1]))
            first = int(self.starts[d]) + pos - int(self.offsets[d])
            parts.append(self.corpus.slice(first, first + end - pos))
            pos, d = end, d + 1
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def split_documents(corpus, fraction: float, seed: int) -> tuple[DocumentSubset, DocumentSubset]:
    """(training, held out): ``fraction`` of the corpus's documents (at least one, and at least one left to train
    on) held out whole, chosen by ``seed`` alone, so every rank and every resume holds out the same ones."""
    num_docs = len(corpus.offsets) - 1
    if num_docs < 2:
        raise DataError(f"data.valid_split={fraction} holds out whole documents, and the training data has "
                        f"{num_docs}: give more documents, or data.valid_folder")
    held = min(max(1, round(fraction * num_docs)), num_docs - 1)
    chosen = np.random.default_rng([seed, 0x7661_6C69]).choice(num_docs, size=held, replace=False)
    mask = np.zeros(num_docs, dtype=bool)
    mask[chosen] = True
    return DocumentSubset(corpus, np.flatnonzero(~mask)), DocumentSubset(corpus, np.flatnonzero(mask))


class PackedRows:
    """Random access to the packed rows of a corpus; ``rows[r]`` is a dict of numpy arrays.

    A corpus is anything with ``offsets`` (documents' start positions in the stream, plus its end),
    ``doc_types`` and ``slice(start, stop)``: an in-memory ``Corpus`` or a memory-mapped
    ``evo.data.tokenized.TokenizedCorpus``.
    """

    def __init__(self, corpus: Corpus, seq_len: int, micro_bsz: int, pack_sample_into_one: bool = False):
        self.corpus, self.seq_len = corpus, seq_len
        self.length = seq_len * micro_bsz
        self.pack_sample_into_one = pack_sample_into_one
        # the last row may be short: it is padded (token 0, label -100, type id -1), so no token is skipped
        self.num_rows = -(-corpus.num_tokens // self.length)

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, r: int) -> dict:
        if not 0 <= r < self.num_rows:
            raise IndexError(r)
        c, L = self.corpus, self.length
        start = r * L
        end = min(start + L, c.num_tokens)  # real tokens of this row end here; padding fills the rest
        n = end - start
        raw = c.slice(start, min(end + 1, c.num_tokens))
        input_ids = np.zeros(L, dtype=np.int64)
        input_ids[:n] = np.abs(raw[:n])
        labels = np.full(L, IGNORE_INDEX, dtype=np.int64)
        labels[: len(raw) - 1] = raw[1:]
        labels[labels < 0] = IGNORE_INDEX  # predicting an input-only token takes no loss
        first_doc = int(np.searchsorted(c.offsets, start, side="right")) - 1
        last_doc = int(np.searchsorted(c.offsets, end - 1, side="right")) - 1
        doc_ends = c.offsets[first_doc + 1:last_doc + 2] - 1 - start
        labels[doc_ends[doc_ends < n]] = IGNORE_INDEX
        doc_starts = c.offsets[first_doc + 1:last_doc + 1] - start  # documents starting inside the row
        seg_bounds = np.concatenate(([0], doc_starts, [n]))
        type_ids = np.full(L, -1, dtype=np.int64)
        type_ids[:n] = np.repeat(c.doc_types[first_doc:last_doc + 1], np.diff(seg_bounds))
        if self.pack_sample_into_one:
            cu = np.arange(0, L + 1, self.seq_len)
        else:
            pieces = [np.arange(a, b, self.seq_len) for a, b in zip(seg_bounds[:-1], seg_bounds[1:])]
            cu = np.unique(np.concatenate(pieces + [[n, L]]))  # padding, if any, is its own segment
        indexes = np.arange(L) - np.repeat(cu[:-1], np.diff(cu))
        return {"input_ids": input_ids, "labels": labels, "cu_seqlens": cu.astype(np.int32), "indexes": indexes,
                "type_ids": type_ids.astype(np.int64)}


class UnpackedRows:
    """``data.use_packed_dataset=False``: each row holds ``micro_bsz`` documents, one per ``seq_len`` slot,
    truncated to seq_len and padded with token 0, label -100 and type id -1 (padding is its own
    ``cu_seqlens`` segment). Labels are the next token of the document (the true one at a truncation)."""

    def __init__(self, corpus, seq_len: int, micro_bsz: int):
        self.corpus, self.seq_len, self.micro_bsz = corpus, seq_len, micro_bsz
        self.length = seq_len * micro_bsz
        self.num_docs = len(corpus.offsets) - 1
        self.num_rows = -(-self.num_docs // micro_bsz)  # a last row with empty slots is padded

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, r: int) -> dict:
        if not 0 <= r < self.num_rows:
            raise IndexError(r)
        c, S = self.corpus, self.seq_len
        input_ids = np.zeros(self.length, dtype=np.int64)
        labels = np.full(self.length, IGNORE_INDEX, dtype=np.int64)
        type_ids = np.full(self.length, -1, dtype=np.int64)
        cu = [0]
        for slot in range(self.micro_bsz):
            d = r * self.micro_bsz + slot
            if d >= self.num_docs:
                cu.append((slot + 1) * S)
                continue
            start, end = int(c.offsets[d]), int(c.offsets[d + 1])
            raw = c.slice(start, min(end, start + S + 1))
            n = min(len(raw), S)
            base = slot * S
            input_ids[base:base + n] = np.abs(raw[:n])
            nxt = raw[1:n + 1]
            labels[base:base + len(nxt)] = np.where(nxt < 0, IGNORE_INDEX, nxt)
            type_ids[base:base + n] = c.doc_types[d]
            cu += [base + n] if n == S else [base + n, base + S]
        cu = np.asarray(cu, dtype=np.int32)
        indexes = np.arange(self.length) - np.repeat(cu[:-1], np.diff(cu))
        return {"input_ids": input_ids, "labels": labels, "cu_seqlens": cu, "indexes": indexes, "type_ids": type_ids}


def batch_counts(inputs: dict, labels: torch.Tensor, n_types: int, sliding_window: int | None) -> torch.Tensor:
    """A step's batch counted for its metrics, float64: [labelled tokens, real tokens (padding carries type id
    -1), seqlen_sq (evo.model.flops), labelled tokens per dataset type, real tokens per type]."""
    type_ids = inputs["type_ids"]
    labelled, real = labels != IGNORE_INDEX, type_ids >= 0
    counts = torch.zeros(3 + 2 * n_types, dtype=torch.float64)
    counts[0], counts[1] = labelled.sum(), real.sum()
    counts[2] = sum(seqlen_sq(c, sliding_window) for c in inputs["cu_seqlens"])
    counts[3:3 + n_types] = torch.bincount(type_ids[labelled].clamp(min=0), minlength=n_types)[:n_types]
    counts[3 + n_types:] = torch.bincount(type_ids[real], minlength=n_types)[:n_types]
    return counts
