"""XLA:CPU compile options for tests (no torch here, unlike parity.py, which re-exports them)."""

# XLA's CPU backend spends seconds per compile at full optimisation; these options cut test compile
# time ~4x and leave float32 results within ~1e-6 of the default build (well inside TOL_SMALL).
FAST_COMPILE = {"xla_cpu_use_fusion_emitters": False, "xla_backend_optimization_level": 0,
                "xla_llvm_disable_expensive_passes": True}
