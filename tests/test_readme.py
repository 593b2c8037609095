"""The command blocks of the README and docs/ marked runnable (``<!-- runnable: ... -->`` above a ```bash block) run as
written, at a small size: each training command gets a few overrides appended (fewer steps and layers), each
generation fewer tokens, and nothing else changes (issue 24: a newcomer gets through the own-data recipe, and the
commands after it, without reading code). A marker saying ``after make train`` runs the default job first (at the
same small size), as a reader who followed the Quickstart has its run folder."""

import json
import re
import shlex
import sys

import pytest

from tests.helpers import ROOT, run_script

SMALL = {"train.py": ["data.total_steps=3", "data.valid_every=2", "model.num_layers=1", "data.seq_len=64",
                      "monitor.sample_prompt=None"],
         "generate.py": ["--tokens", "4"]}
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def runnable_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(the marker's text, the commands) of each ```bash block that follows a ``<!-- runnable`` comment."""
    blocks = re.findall(r"<!-- runnable:?([^>]*)-->\s*```bash\n(.*?)```", text, flags=re.S)
    return [(marker.strip(), [line for line in block.splitlines() if line.strip()]) for marker, block in blocks]


def marked_blocks():
    return [pytest.param(marker, commands, id=f"{path.name}:{' | '.join(commands)[:60]}")
            for path in DOCUMENTS for marker, commands in runnable_blocks(path.read_text())]


def run_as_written(command: str, cwd):
    args = shlex.split(command.split("  #")[0])  # a trailing comment is the reader's, not the shell's business
    assert args[0] == "python" and args[1].startswith("scripts/"), command
    result = run_script(*args[1:], *SMALL.get(args[1].split("/")[-1], []), cwd=cwd)
    assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
    return result


def my_texts(folder):
    """A small text corpus where the own-data recipe looks for the reader's texts."""
    folder.mkdir()
    words = ["The cat sat on the mat.", "The dog ran far away.", "A bird sang in the tree.", "The sun rose late."]
    (folder / "a.txt").write_text("".join(f"{words[i % 4]} Line {i} of many more words here.\n" for i in range(200)))


@pytest.mark.slow  # over 5 s each (make test stays under 10 minutes; .ci/run runs them after)
@pytest.mark.parametrize("marker, commands", marked_blocks())
def test_a_marked_block_runs_as_written(tmp_path, marker, commands):
    for name in ("scripts", "configs", "evo"):  # the commands are written from the repository's root
        (tmp_path / name).symlink_to(ROOT / name)
    if "after make train" in marker:
        run_as_written("python scripts/train.py --config configs/tiny.py", tmp_path)
    if any("my_texts/" in command for command in commands):
        my_texts(tmp_path / "my_texts")
    outputs = [run_as_written(command, tmp_path) for command in commands]
    for command, result in zip(commands, outputs):
        if "generate.py" in command:
            assert "tokens/s" in result.stderr and result.stdout.strip(), command  # it sampled and said how fast
    if "data/mine" in " ".join(commands):  # the own-data recipe ends with a validation loss, as the README says
        records = [json.loads(line) for line in (tmp_path / "runs/mine/metrics.jsonl").read_text().splitlines()]
        losses = [r["val/valid_loss"] for r in records if "val/valid_loss" in r]
        assert len(losses) == 2 and all(loss > 0 for loss in losses)  # steps 2 and 3 (the end)


def test_the_marked_blocks_include_the_recipes():
    found = [" ".join(commands) for _, commands in runnable_blocks((ROOT / "README.md").read_text())]
    for needed in ("scripts/tokenize.py", "data.valid_split", "scripts/generate.py", "to-hf", "from-hf"):
        assert any(needed in block for block in found), needed


def test_the_check_finds_the_marked_blocks():
    text = ("x\n<!-- runnable: after make train -->\n```bash\npython scripts/a.py\n\npython scripts/b.py --x 1\n```\n"
            "```bash\nno\n```\n<!-- runnable -->\n```bash\npython scripts/c.py\n```")
    assert runnable_blocks(text) == [("after make train", ["python scripts/a.py", "python scripts/b.py --x 1"]),
                                     ("", ["python scripts/c.py"])]
    assert sys.executable  # the commands' "python" is this interpreter (run_script)
