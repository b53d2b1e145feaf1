"""XLA:CPU compile options for tests (no torch here, unlike parity.py, which re-exports them)."""

# XLA's CPU backend spends seconds per compile at full optimisation; these options cut test compile
# time ~2-4x and leave float32 results within ~1e-6 of the default build (well inside TOL_SMALL).
FAST_COMPILE = {"xla_cpu_use_fusion_emitters": False, "xla_backend_optimization_level": 0,
                "xla_llvm_disable_expensive_passes": True}


def xla_flags(devices: int = 0) -> str:
  """XLA_FLAGS for the test processes and the main.py / worker subprocesses they start: every
  compile with FAST_COMPILE's options (a test compares runs of one build with each other, or with
  the reference at tolerances these options stay far inside), and `devices` simulated CPU devices."""
  flags = ["--xla_cpu_multi_thread_eigen=true"]
  flags += [f"--{name}={str(value).lower()}" for name, value in FAST_COMPILE.items()]
  if devices:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  return " ".join(flags)
