"""InternEvo's tokenized format, read unchanged and never loaded whole.

A dataset folder holds ``*.bin`` files, one JSON object per line with a ``"tokens"`` list, each with a
``*.bin.meta`` beside it: a numpy array (``np.save``, int32, shape [N, 2]) of each document's byte
offset in the .bin and its token count. Each first-level subfolder of ``train_folder`` is a dataset
type (sorted names give the type ids); files directly in the folder form one type named after it.

The .bin is memory-mapped and documents are parsed on demand through the meta index. Before
training, ``check`` walks every document once (the meta against its .bin, token ids against the
vocabulary), and remembers a dataset that passed in the evo cache, keyed by its files' paths, sizes
and modification times, so the walk happens once per dataset.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np

from evo.data.tokenizer import cache_dir
from evo.errors import DataError


class TokenizedFile:
    """One .bin with its .meta: ``count(i)`` from the meta, ``tokens(i)`` parsed from the .bin."""

    def __init__(self, path: Path):
        self.path = path
        meta_path = Path(str(path) + ".meta")
        if not meta_path.is_file():
            raise DataError(f"'{path}' has no '{meta_path.name}' beside it (InternEvo's index of offsets and counts)")
        try:
            meta = np.load(meta_path)
        except Exception as exc:
            raise DataError(f"'{meta_path}' is not a numpy .npy file: {exc}") from None
        if meta.ndim != 2 or meta.shape[1] != 2 or not np.issubdtype(meta.dtype, np.integer):
            raise DataError(f"'{meta_path}' must be an integer array of shape [N, 2] (offset, count); "
                            f"got {meta.dtype} {list(meta.shape)}")
        self.size = path.stat().st_size
        self.offsets = meta[:, 0].astype(np.int64)
        self.counts = meta[:, 1].astype(np.int64)
        bad = np.flatnonzero((self.offsets < 0) | (self.offsets >= self.size))
        if len(bad):
            raise DataError(f"'{meta_path}': document {bad[0]} has offset {self.offsets[bad[0]]}, past the end of "
                            f"'{path.name}' ({self.size} bytes)")
        if np.any(np.diff(self.offsets) <= 0):
            i = int(np.flatnonzero(np.diff(self.offsets) <= 0)[0]) + 1
            raise DataError(f"'{meta_path}': offsets must increase; document {i} starts at {self.offsets[i]}")
        if np.any(self.counts <= 0):
            i = int(np.flatnonzero(self.counts <= 0)[0])
            raise DataError(f"'{meta_path}': document {i} has token count {self.counts[i]}")
        self._ends = np.append(self.offsets[1:], self.size)
        self._mm = None

    def __len__(self) -> int:
        return len(self.counts)

    def tokens(self, i: int) -> np.ndarray:
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        line = self._mm[self.offsets[i]:self._ends[i]].tobytes()
        try:
            tokens = json.loads(line)["tokens"]
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"'{self.path}': document {i} (byte offset {self.offsets[i]}) is not a JSON object with "
                            f"a \"tokens\" list: {type(exc).__name__}: {exc}") from None
        if len(tokens) != self.counts[i]:
            raise DataError(f"'{self.path}': document {i} (byte offset {self.offsets[i]}) has {len(tokens)} tokens; "
                            f"its .meta says {self.counts[i]}")
        return np.asarray(tokens, dtype=np.int64)


def find_types(folder: str | Path, suffix: str = ".bin", what: str = "InternEvo's tokenized format") -> list[tuple[str, list[Path]]]:
    """[(type name, its ``suffix`` files)]: one type per first-level subfolder (sorted, searched recursively);
    files directly in the folder form a type named after the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder '{folder}' not found")
    types = []
    direct = sorted(folder.glob(f"*{suffix}"))
    if direct:
        types.append((folder.name, direct))
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(sub.rglob(f"*{suffix}"))
        if files:
            types.append((sub.name, files))
    if not types:
        raise DataError(f"data folder '{folder}' holds no {suffix} files ({what})")
    return types


class TokenizedCorpus:
    """The documents of several tokenized files as one stream (see ``evo.data.packing``)."""

    def __init__(self, files: list[TokenizedFile], file_types: list[int], min_length: int = 0):
        self.files = files
        keep_file, keep_doc, lengths, types = [], [], [], []
        for f, (tf, t) in enumerate(zip(files, file_types)):
            docs = np.flatnonzero(tf.counts >= max(min_length, 1))
            keep_file.append(np.full(len(docs), f, dtype=np.int32))
            keep_doc.append(docs)
            lengths.append(tf.counts[docs])
            types.append(np.full(len(docs), t, dtype=np.int32))
        self.doc_file = np.concatenate(keep_file) if keep_file else np.zeros(0, np.int32)
        self.doc_index = np.concatenate(keep_doc) if keep_doc else np.zeros(0, np.int64)
        self.doc_types = np.concatenate(types) if types else np.zeros(0, np.int32)
        lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        self.offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @functools.lru_cache(maxsize=64)  # a document usually spans several consecutive rows
    def document(self, d: int) -> np.ndarray:
        return self.files[self.doc_file[d]].tokens(int(self.doc_index[d]))

    def slice(self, start: int, stop: int) -> np.ndarray:
        out = np.empty(stop - start, dtype=np.int64)
        d = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pos = start
        while pos < stop:
            doc_start, doc_end = self.offsets[d], self.offsets[d + 1]
            piece = self.document(d)[pos - doc_start:min(stop, doc_end) - doc_start]
            out[pos - start:pos - start + len(piece)] = piece
            pos += len(piece)
            d += 1
        return out

    def check(self, vocab_size: int) -> None:
        """Walk every document once: counts against the meta, |token id| < vocab_size. Remembered when it passes."""
        marker = self._marker(vocab_size)
        if marker.exists():
            return
        for tf in self.files:
            for i in range(len(tf)):
                tokens = tf.tokens(i)
                top = int(np.abs(tokens).max())
                if top >= vocab_size:
                    raise DataError(f"'{tf.path}': document {i} (byte offset {tf.offsets[i]}) has token id {top}, "
                                    f"not below 'model.vocab_size' ({vocab_size})")
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()

    def _marker(self, vocab_size: int) -> Path:
        digest = hashlib.sha256(str(vocab_size).encode())
        for tf in self.files:
            st = tf.path.stat()
            digest.update(f"{tf.path.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return cache_dir() / "checked" / digest.hexdigest()[:24]


def tokenized_corpus(types: list[tuple[str, list[Path]]], min_length: int, vocab_size: int,
                     where: str) -> TokenizedCorpus:
    """The checked corpus of ``find_types``' result (type id = position). ``where`` names the folder in errors."""
    files, file_types = [], []
    for t, (_, paths) in enumerate(types):
        for path in paths:
            files.append(TokenizedFile(path))
            file_types.append(t)
    corpus = TokenizedCorpus(files, file_types, min_length)
    if corpus.num_tokens == 0:
        raise DataError(f"{where} has no document of at least data.min_length={min_length} tokens")
    corpus.check(vocab_size)
    return corpus


INT32_MAX = 2**31 - 1


class TokenizedWriter:
    """Writes documents as ``stem.bin`` with its ``.bin.meta``, InternEvo's format, starting ``stem_1.bin``,
    ``stem_2.bin``, ... before a byte offset would pass ``limit`` (int32 by default, what the meta holds)."""

    def __init__(self, stem: str | Path, limit: int = INT32_MAX):
        self.stem, self.limit, self.index = Path(stem), limit, 0
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        self.paths: list[Path] = []
        self._open()

    def _open(self) -> None:
        self.path = self.stem.parent / (self.stem.name + (f"_{self.index}" if self.index else "") + ".bin")
        self.paths.append(self.path)
        self.file, self.meta = open(self.path, "wb"), []

    def write(self, tokens) -> None:
        line = (json.dumps({"tokens": [int(t) for t in tokens]}) + "\n").encode()
        if self.meta and self.file.tell() + len(line) > self.limit:
            self._finish()
            self.index += 1
            self._open()
        self.meta.append((self.file.tell(), len(tokens)))
        self.file.write(line)

    def _finish(self) -> None:
        self.file.close()
        with open(str(self.path) + ".meta", "wb") as f:
            np.save(f, np.asarray(self.meta, dtype=np.int32).reshape(-1, 2))

    def close(self) -> None:
        self._finish()


def write_tokenized(path: str | Path, documents) -> None:
    """Write documents (sequences of token ids) as one .bin (``path``) and its .meta."""
    writer = TokenizedWriter(Path(path).with_suffix(""))
    for tokens in documents:
        writer.write(tokens)
    writer.close()
