"""Data: packing into InternEvo's batch format, built-in corpora, tokenizers, loaders."""

from evo.data.loader import TrainLoader, ValidLoader, build_train_loader, build_valid_loaders
from evo.data.packing import IGNORE_INDEX, Corpus, PackedRows, collate
from evo.data.tokenizer import ByteTokenizer, load_tokenizer

__all__ = ["TrainLoader", "ValidLoader", "build_train_loader", "build_valid_loaders", "collate", "IGNORE_INDEX",
           "Corpus", "PackedRows", "ByteTokenizer", "load_tokenizer"]
