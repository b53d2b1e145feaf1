import os, sys, time
import jax, jax.numpy as jnp, numpy as np
import flax
from flax import nnx
print("jax", jax.__version__, "flax", flax.__version__, jax.devices(), flush=True)
from sam3i_jax.models.config import get_preset
from sam3i_jax.models.vit import ViT

def timed(f, *a, n=5):
  jax.block_until_ready(f(*a))
  t0 = time.perf_counter()
  for _ in range(n): out = f(*a)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / n, out

config = get_preset("full", dtype="bfloat16")
vit = ViT(config, rngs=nnx.Rngs(0)); vit.eval()
for batch in (2, 8):
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, 1008, 1008, 3)), jnp.float32)
  for impl in ("xla", "cudnn"):
    vit.set_attributes(attention_impl=impl)
    g, p, rest = nnx.split(vit, nnx.Param, ...)
    loss = lambda p, x: jnp.mean(nnx.merge(g, p, rest)(x).astype(jnp.float32) ** 2)
    f = jax.jit(jax.grad(loss))
    try:
      t, _ = timed(f, p, x, n=3)
      print(f"bf16 b{batch} fwd+bwd {impl}: {t*1e3:.1f} ms peak {jax.devices()[0].memory_stats()['peak_bytes_in_use']/2**30:.1f} GiB", flush=True)
    except Exception as e:
      print(f"bf16 b{batch} fwd+bwd {impl}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
