"""No hang: when a rank fails mid-step, every other rank exits non-zero, within ``parallel.timeout_s``. Two
processes are started by hand (no torchrun, which would stop the others itself, as slurm's srun does not):
rank 1 raises at step 3 (in the schedule, or inside a MoE layer's expert dispatch), or stalls there (alive,
outside any collective); rank 0 is then waiting in a collective of that step."""

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from tests.test_launch import free_port

TIMEOUT_S = 4
DRIVER = """
import runpy, sys, time
from evo import trainer

run_schedule = trainer.Trainer.execute_schedule


def faulty(self, batch):
    if self.ctx.rank == 1 and self.step_count == 2:
        if sys.argv[2] == "stalls":
            time.sleep(600)
        raise RuntimeError("injected fault on rank 1")
    return run_schedule(self, batch)


if sys.argv[2] == "dispatch":  # rank 1 raises inside the expert all-to-all's layer, the first of step 3
    from evo.parallel import expert

    dispatch, calls = expert.expert_parallel_experts, []

    def faulty_dispatch(*args, **kwargs):
        calls.append(1)
        if expert.dist.get_rank() == 1 and len(calls) > 2 * 2 * 2:  # 2 steps x 2 micro-batches x 2 MoE layers
            raise RuntimeError("injected fault on rank 1")
        return dispatch(*args, **kwargs)

    expert.expert_parallel_experts = faulty_dispatch
else:
    trainer.Trainer.execute_schedule = faulty
sys.argv = ["scripts/train.py", "--config", sys.argv[1]]
runpy.run_path("scripts/train.py", run_name="__main__")
"""


MOE = 'model_type = "QWEN3MOE"\nmodel = dict(model, num_experts=4, top_k=2)'


@pytest.mark.parametrize("fault, parallel", [
    ("raises", 'tensor=dict(size=2, mode="msp")'),
    ("raises", 'pipeline=dict(size=2, mode="1F1B")'),  # rank 0 then waits in a point-to-point receive
    ("dispatch", 'expert=dict(size=2)'),  # rank 0 then waits in the experts' all-to-all
    pytest.param("stalls", 'tensor=dict(size=2, mode="msp")', marks=pytest.mark.slow)])
def test_a_failing_rank_makes_every_other_rank_exit_within_the_timeout(tmp_path, fault, parallel):
    (tmp_path / "driver.py").write_text(DRIVER)
    (tmp_path / "cfg.py").write_text(f"""
model = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=300, multiple_of=32, dtype="torch.float32")
{MOE if fault == "dispatch" else ""}
data = dict(type="dummy", seq_len=32, micro_bsz=2, micro_num=2, total_steps=6, num_dummy_samples=100)
parallel = dict({parallel}, timeout_s={TIMEOUT_S})
ckpt = dict(enable_save_ckpt=False)
monitor = dict(run_folder="{tmp_path / 'run'}")
""")
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "cfg.py"), fault],
                                      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        # start-up and two steps take a few seconds; rank 1 stalls for 10 minutes: rank 0 must not wait for it
        _, err = procs[0].communicate(timeout=60)
        assert procs[0].returncode != 0, err
        steps = (tmp_path / "run" / "train.log").read_text()
        assert "step 2/6" in steps and "step 3/6" not in steps  # it was stopped in step 3, not before
        if fault != "stalls":
            _, err1 = procs[1].communicate(timeout=60)
            assert procs[1].returncode != 0 and "injected fault on rank 1" in err1
        else:  # the stalled rank leaves too: gloo times out its side of the collective rank 0 started
            procs[1].communicate(timeout=TIMEOUT_S + 30)
            assert procs[1].returncode != 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
