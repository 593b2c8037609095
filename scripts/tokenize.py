"""Turn raw text into InternEvo's tokenized format.

    python scripts/tokenize.py --input FILE_OR_FOLDER --output FOLDER [--tokenizer tokenizer.json|byte|bpe]
                               [--text-key text] [--workers N]

Inputs: ``.jsonl`` (one JSON object per line, the text under --text-key), ``.json`` (the same as JSON
lines, or one JSON array of such objects), ``.txt`` (each line is a document). A folder is searched
recursively and its layout kept, so first-level subfolders become dataset types. Each input file
becomes ``<output>/<relative path>.bin`` with its ``.bin.meta`` (a new ``_<k>.bin`` shard starts
before any byte offset would pass int32). EOS is appended to every document. Output is
deterministic. Lines that are not JSON objects with a string under --text-key are reported by file
and line, skipped and counted.
"""

import os
import sys

# This file shares its name with the standard library's tokenize module, which other modules import:
# take the scripts folder off the path (it is sys.path[0] when run as a script) and put the repo root
# there, so `import tokenize` finds the standard one and evo imports from a source tree too.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import json  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

from tqdm import tqdm  # noqa: E402

from evo.cli import run  # noqa: E402
from evo.data.tokenized import INT32_MAX, TokenizedWriter  # noqa: E402
from evo.data.tokenizer import load_tokenizer  # noqa: E402
from evo.errors import DataError  # noqa: E402

SUFFIXES = (".jsonl", ".json", ".txt")
BATCH = 256  # documents encoded together (the tokenizers package parallelizes a batch)


def input_files(path: Path) -> list[tuple[Path, Path]]:
    """[(file, path relative to the input root)]"""
    if path.is_file():
        return [(path, Path(path.name))]
    if not path.is_dir():
        raise DataError(f"--input '{path}' not found")
    files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"--input '{path}' holds no {', '.join(SUFFIXES)} files")
    return [(p, p.relative_to(path)) for p in files]


def documents(path: Path, text_key: str, bad: list):
    """Yield the texts of one file in order; append (line number, reason) to ``bad`` for skipped lines."""
    with open(path, encoding="utf-8", errors="replace") as f:
        if path.suffix == ".txt":
            for line in f:
                yield line.rstrip("\n")
            return
        first = f.read(1)
        f.seek(0)
        if path.suffix == ".json" and first == "[":
            records = enumerate(json.load(f), 1)  # a JSON array: read whole (use .jsonl for huge files)
        else:
            records = ((n, line) for n, line in enumerate(f, 1) if line.strip())
        for n, record in records:
            if isinstance(record, str):
                try:
                    record = json.loads(record)
                except ValueError as exc:
                    bad.append((n, f"not JSON ({exc.msg})"))
                    continue
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                bad.append((n, f"no string under '{text_key}'"))
                continue
            yield record[text_key]


def tokenize_file(path: Path, out_stem: Path, tokenizer_path: str, text_key: str, limit: int) -> dict:
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.eos_id is None:
        raise DataError(f"tokenizer '{tokenizer_path}' has no end-of-sequence token")
    bad, docs, tokens = [], 0, 0
    writer = TokenizedWriter(out_stem, limit)
    batch = []

    def flush():
        nonlocal docs, tokens
        for ids in tokenizer.encode_batch(batch):
            writer.write(ids + [tokenizer.eos_id])
            docs += 1
            tokens += len(ids) + 1
        batch.clear()

    for text in documents(path, text_key, bad):
        batch.append(text)
        if len(batch) == BATCH:
            flush()
    flush()
    writer.close()
    return {"file": str(path), "documents": docs, "tokens": tokens, "bad": bad, "shards": [str(p) for p in writer.paths]}


def main():
    parser = argparse.ArgumentParser(description="Tokenize .jsonl/.json/.txt into InternEvo's tokenized format.")
    parser.add_argument("--input", required=True, help="a file, or a folder searched recursively")
    parser.add_argument("--output", required=True, help="output folder (the input's layout is kept)")
    parser.add_argument("--tokenizer", default="byte", help="a tokenizer.json, 'byte' or 'bpe' (evo's built-in ones)")
    parser.add_argument("--text-key", default="text", help="the JSON field holding the text")
    parser.add_argument("--workers", type=int, default=1, help="files tokenized in parallel")
    parser.add_argument("--max-shard-bytes", type=int, default=INT32_MAX, help=argparse.SUPPRESS)  # tests
    args = parser.parse_args()
    load_tokenizer(args.tokenizer)  # a bad tokenizer fails here, once, before any work
    files = input_files(Path(args.input))
    out = Path(args.output)
    jobs = [(p, (out / rel).with_suffix(""), args.tokenizer, args.text_key, args.max_shard_bytes) for p, rel in files]
    results = []
    with tqdm(total=len(jobs), desc="tokenize", unit="file", file=sys.stderr) as bar:
        if args.workers > 1:
            with ProcessPoolExecutor(args.workers) as pool:
                for result in pool.map(tokenize_file, *zip(*jobs)):
                    results.append(result)
                    bar.update()
        else:
            for job in jobs:
                results.append(tokenize_file(*job))
                bar.update()
    skipped = 0
    for r in results:
        for line, reason in r["bad"]:
            print(f"{r['file']}:{line}: skipped: {reason}", file=sys.stderr)
        skipped += len(r["bad"])
    print(f"{sum(r['documents'] for r in results)} documents, {sum(r['tokens'] for r in results)} tokens, "
          f"{skipped} lines skipped, into {out}")


if __name__ == "__main__":
    run(main)
