"""Tokenizers: evo's built-in ones, or any Hugging Face ``tokenizer.json``.

- ``"byte"`` (or None): each UTF-8 byte is its own token (0..255), BOS = 256, EOS = 257. Nothing to
  train or download; every text round-trips.
- ``"bpe"``: a 4096-token byte-level BPE trained with the ``tokenizers`` package on the built-in
  corpus's training split the first time it is asked for (about 2 s on 2 CPU cores), then cached
  under ``$EVO_CACHE_DIR`` (default ``~/.cache/evo``), keyed by the Python installation.
- any other value: the path of a ``tokenizer.json``.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from evo.errors import DataError


class ByteTokenizer:
    name = "byte"
    bos_id, eos_id = 256, 257
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def token(self, token_id: int | None) -> str | None:
        """The string of a token id: ``<s>``, ``</s>``, or the byte's character in the byte-level alphabet."""
        if token_id is None:
            return None
        return {self.bos_id: "<s>", self.eos_id: "</s>"}.get(token_id) or _BYTE_CHARS[token_id]

    def save_json(self, path: str | Path) -> None:
        """This tokenizer as a ``tokenizer.json`` that transformers loads (``PreTrainedTokenizerFast``) and that
        gives the same ids: a byte-level BPE with no merges, so each byte is one token whose id is its value,
        and ``<s>``, ``</s>`` as 256 and 257."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        vocab = {_BYTE_CHARS[b]: b for b in range(256)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
        tok.save(str(path))


def _byte_chars() -> list[str]:
    """The byte-level alphabet (GPT-2's): byte b as a printable character, the printable Latin-1 bytes as
    themselves and the others moved past 255 in order, so no byte maps to whitespace or a control character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


_BYTE_CHARS = _byte_chars()


class HFTokenizer:
    """A ``tokenizers`` fast tokenizer from a tokenizer.json file."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as exc:
            raise DataError(f"tokenizer file '{path}' could not be read: {exc}") from exc
        self.name = self.path = path
        self.vocab_size = self._tok.get_vocab_size()
        self.eos_id = next((self._tok.token_to_id(t) for t in ("</s>", "<|endoftext|>", "<eos>", "[SEP]")
                            if self._tok.token_to_id(t) is not None), None)
        self.bos_id = next((self._tok.token_to_id(t) for t in ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]")
                            if self._tok.token_to_id(t) is not None), None)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def token(self, token_id: int | None) -> str | None:
        """The string of a token id (None for None)."""
        return None if token_id is None else self._tok.id_to_token(token_id)

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]


BPE_VOCAB_SIZE = 4096


def cache_dir() -> Path:
    return Path(os.environ.get("EVO_CACHE_DIR") or Path.home() / ".cache" / "evo")


def builtin_bpe_path() -> Path:
    """Where the built-in BPE for this Python installation is cached (a function of its stdlib files)."""
    from evo.data.builtin import stdlib_files

    digest = hashlib.sha256(sys.version.encode())
    for path in stdlib_files():
        digest.update(f"{path}:{path.stat().st_size}\n".encode())
    return cache_dir() / "tokenizers" / f"stdlib-bpe{BPE_VOCAB_SIZE}-{digest.hexdigest()[:16]}.json"


def train_builtin_bpe(path: Path) -> None:
    """Train the built-in BPE on the built-in corpus's training split and write it to ``path`` atomically."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from evo.data.builtin import split_files

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((p.read_text(encoding="utf-8", errors="replace") for p in split_files("train")), trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)


def load_tokenizer(path: str | None):
    """``None`` or ``"byte"``: the byte tokenizer; ``"bpe"``: the built-in BPE; else a tokenizer.json path."""
    if path is None or path == "byte":
        return ByteTokenizer()
    if path == "bpe":
        file = builtin_bpe_path()
        if not file.is_file():
            train_builtin_bpe(file)
        tok = HFTokenizer(str(file))
        tok.name = "bpe"
        return tok
    if not Path(path).is_file():
        raise DataError(f"tokenizer file '{path}' not found (use a tokenizer.json or 'byte')")
    return HFTokenizer(path)
