"""The Colab notebook's code cells, run headless (nbclient, an IPython kernel of this Python) on a
random-weight tiny SAM 3 checkpoint in the released layout: install (skipped off Colab),
conversion, segmentation at the three levels, a few fine-tuning steps and segmentation again."""

import os
import sys

import nbformat
import parity  # noqa: F401  (sam3_cpu's workarounds before torch)
import pytest
import torch
from full_size_reference import released_layout
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "sam3i_jax_colab.ipynb")


def outputs_of(cell) -> tuple[str, int]:
  """(the cell's printed text, its number of displayed PNG images)."""
  text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
  images = sum("image/png" in o.get("data", {}) for o in cell.outputs
               if o.output_type in ("display_data", "execute_result"))
  return text, images


@pytest.mark.xdist_group("notebook")
def test_colab_notebook_runs_headless(tmp_path, monkeypatch):
  _, torch_model, _ = parity.reference_model("tiny")
  checkpoint = tmp_path / "sam3.pt"
  torch.save(released_layout(torch_model), checkpoint)
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  parameters = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(parameters) == 1
  parameters[0].source = (f"CHECKPOINT = {str(checkpoint)!r}\nKIND = 'sam3'\nPRESET = 'tiny'\n"
                          f"WORKDIR = {str(tmp_path / 'run')!r}\nFINETUNE_STEPS = 2\n")
  # The kernelspec runs `python`: this interpreter, with this environment's packages.
  monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  NotebookClient(notebook, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": REPO}}).execute()

  code = [c for c in notebook.cells if c.cell_type == "code"]
  printed = {i: outputs_of(c) for i, c in enumerate(code)}
  convert_text, _ = printed[3]
  assert "converted" in convert_text.lower() and "--adapters" in convert_text
  for index in (4, 6):  # before and after fine-tuning: one picture per level
    text, images = printed[index]
    assert images == 3, (index, text)
    for level in ("concept", "simple", "complex"):
      assert f"[{level}]" in text
  finetune_text, _ = printed[5]
  assert "stage 1 step 2/2" in finetune_text and "stage 1 evaluation:" in finetune_text
  assert (tmp_path / "run" / "finetune" / "stage1" / "final" / "config.json").exists()
