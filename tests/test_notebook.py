"""notebooks/kernels_tour.ipynb runs top to bottom (nbclient, a fresh kernel; on a CPU the reference backend, and
Triton's interpreter for one kernel): every kernel checked against its formula; the committed file has no
outputs."""

import nbformat

from tests.helpers import ROOT

NOTEBOOK = ROOT / "notebooks" / "kernels_tour.ipynb"


def test_the_kernels_notebook_runs_and_every_check_passes():
    import nbclient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                      if o.get("output_type") == "stream")
    for name in ("rms_norm", "swiglu", "apply_rotary_emb", "cross_entropy", "fused_linear_cross_entropy",
                 "flash_attn_varlen_func", "rms_norm, Triton vs reference"):
        assert f"{name} " in printed and "max abs diff" in printed, name
    pictures = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(pictures) == 1 and "-kernels.png" in printed  # the committed benchmark picture, shown
