"""The README's command blocks marked runnable (``<!-- runnable: ... -->`` above a ```bash block) run as written,
at a small size: the training command gets a few overrides appended (fewer steps and layers), nothing else
changes (issue 24: a newcomer's own-data recipe works without reading code)."""

import json
import re
import shlex
import sys

import pytest

from tests.helpers import ROOT, run_script

SMALL = {"train.py": ["data.total_steps=3", "data.valid_every=2", "model.num_layers=1", "data.seq_len=64",
                      "monitor.sample_prompt=None"],
         "generate.py": ["--tokens", "4"]}


def runnable_blocks(text: str) -> list[list[str]]:
    """The commands of each ```bash block that follows a ``<!-- runnable`` comment."""
    blocks = re.findall(r"<!-- runnable[^>]*-->\s*```bash\n(.*?)```", text, flags=re.S)
    return [[line for line in block.splitlines() if line.strip()] for block in blocks]


@pytest.mark.slow  # over 5 s (make test stays under 10 minutes; .ci/run runs it after)
def test_the_own_data_recipe_runs_as_written(tmp_path):
    (blocks,) = [b for b in runnable_blocks((ROOT / "README.md").read_text()) if "data/mine" in " ".join(b)]
    for name in ("scripts", "configs", "evo"):  # the commands are written from the repository's root
        (tmp_path / name).symlink_to(ROOT / name)
    texts = tmp_path / "my_texts"
    texts.mkdir()
    words = ["The cat sat on the mat.", "The dog ran far away.", "A bird sang in the tree.", "The sun rose late."]
    (texts / "a.txt").write_text("".join(f"{words[i % 4]} Line {i} of many more words here.\n" for i in range(200)))
    for command in blocks:
        args = shlex.split(command)
        assert args[0] == "python" and args[1].startswith("scripts/"), command
        script = args[1].split("/")[-1]
        result = run_script(*args[1:], *SMALL.get(script, []), cwd=tmp_path)
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
    records = [json.loads(line) for line in (tmp_path / "runs" / "mine" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["val/valid_loss"] for r in records if "val/valid_loss" in r]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)  # steps 2 and 3 (the end)


def test_the_check_finds_the_marked_blocks():
    text = "x\n<!-- runnable: here -->\n```bash\npython scripts/a.py\n\npython scripts/b.py --x 1\n```\n```bash\nno\n```"
    assert runnable_blocks(text) == [["python scripts/a.py", "python scripts/b.py --x 1"]]
    assert sys.executable  # the commands' "python" is this interpreter (run_script)
