import json

from evo.data.tokenized import TokenizedFile, find_types
from evo.data.tokenizer import ByteTokenizer
from tests.helpers import run_script


def test_tokenize_then_read_round_trip_with_bad_lines_and_shards(tmp_path):
    src = tmp_path / "raw"
    (src / "en").mkdir(parents=True)
    (src / "code").mkdir()
    lines = [json.dumps({"text": f"document number {i} " * (i % 5 + 1)}) for i in range(40)]
    lines.insert(3, "this is not json")
    lines.insert(10, json.dumps({"content": "wrong key"}))
    (src / "en" / "a.jsonl").write_text("\n".join(lines) + "\n")
    (src / "code" / "b.txt").write_text("def f():\nreturn 1\n")
    (src / "code" / "c.json").write_text(json.dumps([{"text": "x = 1"}, {"text": "y = 2"}]))
    out = tmp_path / "tok"
    args = ["scripts/tokenize.py", "--input", src, "--output", out, "--max-shard-bytes", "2000"]
    result = run_script(*args, "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert f"{src / 'en' / 'a.jsonl'}:4: skipped: not JSON" in result.stderr
    assert f"{src / 'en' / 'a.jsonl'}:11: skipped: no string under 'text'" in result.stderr
    assert "44 documents" in result.stdout and "2 lines skipped" in result.stdout

    types = find_types(out)
    assert [name for name, _ in types] == ["code", "en"]
    en_shards = types[1][1]
    assert len(en_shards) > 1  # the 2000-byte limit forced new shards
    tok = ByteTokenizer()
    texts = [tok.decode(TokenizedFile(p).tokens(i)) for p in en_shards for i in range(len(TokenizedFile(p)))]
    assert texts == [json.loads(line)["text"] for line in lines if line.startswith('{"text"')]
    first = TokenizedFile(en_shards[0]).tokens(0)
    assert first[-1] == tok.eos_id
    assert all(TokenizedFile(p).size <= 2000 for p in en_shards)

    # deterministic: a second run (one worker) writes the same bytes
    again = run_script(*[str(a).replace(str(out), str(tmp_path / "tok2")) for a in args])
    assert again.returncode == 0, again.stderr
    for p in out.rglob("*.bin*"):
        assert p.read_bytes() == (tmp_path / "tok2" / p.relative_to(out)).read_bytes(), p


def test_tokenize_missing_input_exits_2(tmp_path):
    result = run_script("scripts/tokenize.py", "--input", tmp_path / "nope", "--output", tmp_path / "o")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"evo: error: --input '{tmp_path / 'nope'}' not found"


def test_tokenize_with_a_tokenizer_json(tmp_path):
    from evo.data.tokenizer import builtin_bpe_path, load_tokenizer

    bpe = load_tokenizer("bpe")  # evo's built-in BPE is an ordinary tokenizer.json file
    (tmp_path / "raw.jsonl").write_text(json.dumps({"body": "import os\nprint(os.getcwd())"}) + "\n")
    result = run_script("scripts/tokenize.py", "--input", tmp_path / "raw.jsonl", "--output", tmp_path / "out",
                        "--tokenizer", builtin_bpe_path(), "--text-key", "body")
    assert result.returncode == 0, result.stderr
    tokens = TokenizedFile(tmp_path / "out" / "raw.bin").tokens(0).tolist()
    assert tokens == bpe.encode("import os\nprint(os.getcwd())") + [bpe.eos_id]
