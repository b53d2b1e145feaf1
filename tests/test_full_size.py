"""Full-size (840M-parameter) parity: Meta's sam3.pt layout -> python -m convert -> load_pretrained.

The PyTorch model runs in a subprocess (tests/full_size_reference.py) that writes a random-weight
`sam3.pt` with the released keys (detector.* + tracker.*), the same weights in SAM 3.1's layout,
and its outputs on an image no other test uses (the image side runs once for both prompts, here as
there); each conversion runs in a subprocess whose peak memory is measured. Tolerance: relative
L2 <= 1e-4 per output at float32 / highest precision, and identical kept-mask sets.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import parity
import pytest
from flax import nnx

from full_size_reference import BOX_LABELS, BOXES
from sam3i_jax.pretrained import load_pretrained

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)
MEASURE_CONVERT = ("import resource, sys; from convert.__main__ import main; rc = main(sys.argv[1:]); "
                   "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")


def convert_measured(checkpoint, output, env) -> str:
  """`python -m convert sam3` in a subprocess whose peak memory must stay <= 2x the checkpoint."""
  run = subprocess.run([sys.executable, "-c", MEASURE_CONVERT, "sam3", "--checkpoint", str(checkpoint),
                        "--output", str(output)], env=env, capture_output=True, text=True, timeout=900,
                       cwd=ROOT)
  assert run.returncode == 0, run.stdout + run.stderr
  print(run.stdout)
  peak = int(run.stdout.split("MAXRSS_KB")[1].split()[0]) * 1024
  size = checkpoint.stat().st_size
  assert peak <= 2 * size, f"converting {checkpoint.name} peaked at {peak / 1e9:.1f} GB for a " \
                           f"{size / 1e9:.1f} GB checkpoint"
  return run.stdout


@pytest.mark.slow
@pytest.mark.xdist_group("full_size")
def test_full_size_sam3_pt_converts_and_matches_reference(tmp_path):
  env = {**os.environ, "PYTHONPATH": ROOT}
  run = subprocess.run([sys.executable, os.path.join(HERE, "full_size_reference.py"), str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=1500)
  assert run.returncode == 0, run.stdout + run.stderr
  print(run.stdout)
  converted = tmp_path / "converted"
  log = convert_measured(tmp_path / "sam3.pt", converted, env)
  assert "ignored 309 tensors: video tracker" in log
  # SAM 3.1's layout of the same weights: its tracker (457 tensors) and tracker neck branches are
  # reported and left out; every image-model tensor but the unused convs.3 is loaded.
  log = convert_measured(tmp_path / "sam3.1_multiplex.pt", tmp_path / "converted_sam3.1", env)
  with open(tmp_path / "converted_sam3.1" / "conversion.json") as f:
    report = json.load(f)
  assert report["variant"] == "sam3.1" and report["tensors_in_checkpoint"] == 1623, report
  assert report["loaded"] == 1101 - 4 and report["ignored"]["video tracker (tracker.*)"] == 457, report

  ref = dict(np.load(tmp_path / "reference.npz"))
  model = load_pretrained(str(converted))
  image = jnp.asarray(ref["image"].transpose(0, 2, 3, 1))
  features = nnx.jit(lambda m, x: m.encode_image(x))(model, image)
  ground = nnx.jit(lambda m, f, tokens, *boxes: m.ground(f, m.encode_text(tokens), *boxes))
  text = jax.device_get(ground(model, features, jnp.asarray(ref["text/input.text_tokens"])))
  box = jax.device_get(ground(
      model, features, jnp.asarray(ref["box/input.text_tokens"]),
      jnp.asarray([BOXES], jnp.float32), jnp.asarray([BOX_LABELS]), jnp.zeros((1, len(BOXES)), bool)))
  for prefix, ours in (("text/", text), ("box/", box)):
    part = {k[len(prefix):]: v for k, v in ref.items() if k.startswith(prefix)}
    for name, ref_name in parity.COMPARED.items():
      parity.assert_close(ours[name], part[ref_name], parity.TOL_FULL, prefix + name)
    parity.assert_same_kept_sets(ours, part)
