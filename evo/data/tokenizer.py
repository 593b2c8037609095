"""Tokenizers: evo's built-in byte-level one, or any Hugging Face ``tokenizer.json``.

The byte tokenizer maps each UTF-8 byte to its value (0..255) and adds BOS = 256 and EOS = 257:
nothing to train or download, every text round-trips, and it works for any language and for code.
"""

from __future__ import annotations

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


class HFTokenizer:
    """A ``tokenizers`` fast tokenizer from a tokenizer.json file."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as exc:
            raise DataError(f"tokenizer file '{path}' could not be read: {exc}") from exc
        self.name = path
        self.vocab_size = self._tok.get_vocab_size()
        self.eos_id = next((self._tok.token_to_id(t) for t in ("</s>", "<|endoftext|>", "<eos>", "[SEP]")
                            if self._tok.token_to_id(t) is not None), None)
        self.bos_id = next((self._tok.token_to_id(t) for t in ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]")
                            if self._tok.token_to_id(t) is not None), None)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids))


def load_tokenizer(path: str | None):
    """``None`` or ``"byte"``: the byte tokenizer; else the path of a tokenizer.json."""
    if path is None or path == "byte":
        return ByteTokenizer()
    if not Path(path).is_file():
        raise DataError(f"tokenizer file '{path}' not found (use a tokenizer.json or 'byte')")
    return HFTokenizer(path)
