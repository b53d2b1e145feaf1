"""Test-wide settings: float32 parity needs the highest matmul precision."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
sys.path.insert(0, os.path.dirname(__file__))  # sam3_cpu and parity helpers

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
