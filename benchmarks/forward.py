"""Forward-pass time of the Flax SAM 3 vs Meta's PyTorch SAM 3 on this machine.

  python benchmarks/forward.py [--preset full] [--repeats 3] [--output benchmarks/results/forward.json]

Both sides run the same random-weight model (text prompt, batch 1, float32) in their own subprocess,
so each peak-memory figure is that framework's alone. Flax: jit-compiled `Sam3Image.__call__`
(compile time reported separately); PyTorch: `forward_image` + `forward_text` + `forward_grounding`
in inference mode, as sam3_cpu.run_text does. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

ROOT = common.ROOT
TEXT = "a red car"


def worker_torch(preset: str, repeats: int) -> dict:
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import parity  # noqa: F401  (applies sam3_cpu's CPU workarounds)
  import sam3_cpu
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  from sam3i_jax.models.config import get_preset
  t = time.time()
  model = (sam3_cpu.build_full(0, perturb=0.02) if preset == "full"
           else sam3_cpu.build_tiny(0, perturb=0.02, **parity.reference_sizes(get_preset(preset))))
  build = time.time() - t
  image = sam3_cpu.random_image(model, seed=0)
  times = []
  for _ in range(repeats):
    t = time.time()
    sam3_cpu.run_text(model, image, TEXT)
    times.append(time.time() - t)
  return {"framework": f"pytorch {torch.__version__}", "build_s": build, "forward_s": times,
          "threads": torch.get_num_threads(), "peak_rss_gb": common.peak_rss_gb()}


def worker_flax(preset: str, repeats: int, dtype: str) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from sam3i_jax.models.config import get_preset
  from sam3i_jax.models.sam3 import Sam3Image
  from sam3i_jax.tokenizer import ClipTokenizer
  config = get_preset(preset, dtype=dtype)
  t = time.time()
  model = Sam3Image(config, rngs=nnx.Rngs(0))
  model.eval()
  build = time.time() - t
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, i, tok: nnx.merge(graphdef, s)(i, tok))
  image = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, config.img_size, config.img_size, 3)),
                      jnp.float32)
  tokens = jnp.asarray(ClipTokenizer()([TEXT]))
  t = time.time()
  compiled = forward.lower(state, image, tokens).compile()
  compile_s = time.time() - t
  times = []
  for _ in range(repeats):
    t = time.time()
    jax.block_until_ready(compiled(state, image, tokens))
    times.append(time.time() - t)
  device = jax.devices()[0]
  return {"framework": f"jax {jax.__version__} ({device.platform}: {device.device_kind})", "build_s": build,
          "compile_s": compile_s, "forward_s": times, "dtype": dtype,
          "peak_rss_gb": common.peak_rss_gb()}


def _run_worker(kind: str, args) -> dict:
  print(f"running the {kind} side ...", flush=True)
  return common.run_worker(__file__, ["--worker", kind, "--preset", args.preset,
                                      "--repeats", str(args.repeats), "--dtype", args.dtype])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="full")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "forward.json"))
  parser.add_argument("--flax-only", action="store_true",
                      help="time only the Flax side (e.g. on an accelerator where the reference does not run)")
  parser.add_argument("--worker", choices=("torch", "flax"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker == "torch":
    print(json.dumps(worker_torch(args.preset, args.repeats)))
    return
  if args.worker == "flax":
    print(json.dumps(worker_flax(args.preset, args.repeats, args.dtype)))
    return

  flax_result = _run_worker("flax", args)
  result = {
      "preset": args.preset, "batch": 1, "prompt": "text", "dtype": args.dtype,
      "machine": common.machine(),
      "flax": flax_result,
  }
  best_flax = min(flax_result["forward_s"])
  print(f"\nSAM 3 forward, preset={args.preset}, batch 1, text prompt, {args.dtype}, {os.cpu_count()} cores")
  print(f"{'':10s} {'best fwd s':>11s} {'compile s':>10s} {'peak RSS GB':>12s}")
  print(f"{'flax':10s} {best_flax:11.3f} {flax_result['compile_s']:10.1f} {flax_result['peak_rss_gb']:12.2f}"
        f"   ({flax_result['framework']})")
  if not args.flax_only:
    torch_result = _run_worker("torch", args)
    best_torch = min(torch_result["forward_s"])
    result.update(pytorch=torch_result, flax_over_pytorch=best_flax / best_torch)
    print(f"{'pytorch':10s} {best_torch:11.3f} {'-':>10s} {torch_result['peak_rss_gb']:12.2f}")
    print(f"ratio flax / pytorch: {result['flax_over_pytorch']:.2f}")
  common.write_json(result, args.output)


if __name__ == "__main__":
  main()
