"""Test-wide settings: float32 parity needs the highest matmul precision."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # sam3_cpu and parity helpers
from xla_cpu import xla_flags  # noqa: E402

# Every program of the suite (and of the subprocesses, which inherit the environment) is compiled
# with the fast-compile options: compiling, not running, is most of the suite's time.
os.environ.setdefault("XLA_FLAGS", xla_flags())
# The test lock installs libtpu (for the deviceless TPU compile test); without this JAX would try
# to start a TPU runtime in every test process (and its subprocesses) of this CPU-only suite.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory):
  """One persistent compilation cache for the training runs of the whole session (shared by the
  xdist workers and the main.py subprocesses): the same tiny-model programs compile once."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the session's folder, above each worker's own
  return root / "jax_cache"
