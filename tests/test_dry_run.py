"""``scripts/train.py --dry-run`` (issue 24): the config and layout checked, the model built on the meta device,
a report of the differences from the defaults, the parameter count, the per-rank memory and the data; exit 0,
and nothing written."""

import re

import pytest

from tests.helpers import ROOT, run_script


def files_under(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


def test_a_dry_run_reports_the_run_and_writes_nothing(tmp_path):
    before = files_under(tmp_path)
    result = run_script(ROOT / "scripts" / "train.py", "--config", ROOT / "configs" / "tiny.py", "--dry-run",
                        "model.num_layers=2", "ckpt.checkpoint_every=50", f"monitor.run_folder={tmp_path / 'run'}",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert files_under(tmp_path) == before  # no run folder, no log, no checkpoint
    assert "  model.num_layers: 2\n" in out and "  ckpt.checkpoint_every: 50\n" in out
    assert "  adam.lr: 0.003\n" in out and "adam.adam_eps" not in out  # tiny's own value shows, a default does not
    # 2 layers of (4 attention matrices 256 x 256 / 256 x 128 + 3 MLP matrices 256 x 704 + 2 norms) + embedding,
    # head and final norm, counted from the shapes by hand
    layer = 256 * 256 + 2 * 256 * 128 + 256 * 256 + 3 * 256 * 704 + 2 * 256
    assert f"model: {(2 * layer + 2 * 258 * 256 + 256) / 1e6:.2f}M parameters" in out
    assert re.search(r"memory per rank \(model state\): master weights [\d.]+ MiB, gradients [\d.]+ MiB, optimizer "
                     r"state [\d.]+ MiB, total [\d.]+ MiB", out)
    assert re.search(r"\n  \d+ documents, \d+ tokens, \d+ packed rows of 512 tokens: \d+ steps per epoch", out)
    assert "validation 'python': 8 batches of 4 rows" in out


@pytest.mark.slow  # over 5 s (make test stays under 10 minutes; .ci/run runs it after)
def test_a_dry_run_checks_the_layout_against_the_launchers_world(tmp_path):
    result = run_script("scripts/train.py", "--config", "configs/tiny.py", "--dry-run", "parallel.tensor.size=4",
                        env={"WORLD_SIZE": "2", "RANK": "0"})
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("evo: error: 'parallel.tensor.size' (4) x 'parallel.pipeline.size' (1) must divide the "
                           "world size (2 processes)")
    ok = run_script("scripts/train.py", "--config", "configs/tiny.py", "--dry-run", "parallel.tensor.size=2",
                    "parallel.zero1.size=2", "data.type=dummy", "data.tokenizer_path=None", "data.valid_every=0")
    assert ok.returncode == 0, ok.stderr
    assert "layout: world 4 = pp 1 x dp 2 x tp 2" in ok.stdout  # alone: the smallest world the layout fits
    assert "validation: none (no validation data: no evaluation will run)" in ok.stdout


@pytest.mark.slow  # over 5 s
def test_a_dry_run_of_expert_groups_reports_their_share_of_the_experts():
    """Alone, expert groups of 8 need 8 data ranks: the report's layout is that world and its memory the one
    computed_memory gives with the experts spread (configs/qwen3_30b_a3b.py: docs/parallel.md's 8-GPU row)."""
    from bench.parallel import computed_memory, model_config
    from evo.parallel.parallelize import format_bytes

    ok = run_script("scripts/train.py", "--config", "configs/qwen3_30b_a3b.py", "--dry-run", "parallel.expert.size=8")
    assert ok.returncode == 0, ok.stderr
    assert "layout: world 8 = pp 1 x dp 8 x tp 1" in ok.stdout and "expert groups of 8)" in ok.stdout
    memory = computed_memory(model_config("qwen3_30b_a3b"), 8, 1, -1, ep=8)
    assert f"compute weights {format_bytes(memory['compute_weights'])}, total {format_bytes(memory['total'])}" in \
        ok.stdout
