"""``scripts/train.py`` with auto-resume's search for a checkpoint disabled (tests/resume.py): the break every
resume test must catch. Run from the repository root as ``python -m tests.no_resume_search --config ...``
(or under torchrun with ``-m``)."""

import runpy
from pathlib import Path

if __name__ == "__main__":
    # train.py's module-level setup first (its deterministic-math environment is set before torch loads)
    script = runpy.run_path(str(Path(__file__).resolve().parent.parent / "scripts" / "train.py"), run_name="train")
    from tests.resume import no_resume_search

    with no_resume_search():
        script["run"](script["main"])
