"""make_global_batch on 4 simulated CPU devices (a subprocess: this process's JAX has 1 device)."""

import os
import subprocess
import sys
import textwrap

from xla_cpu import xla_flags

SCRIPT = textwrap.dedent("""
    import jax
    import numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from input_pipeline import make_global_batch, transforms

    assert jax.device_count() == 4
    rng = np.random.default_rng(0)
    spec = transforms.ExampleSpec(image_size=28, mask_size=8, context_length=5, max_targets=3)
    examples = [transforms.padding_example(spec, with_text=True) for _ in range(4)]
    batch = {k: np.stack([e[k] for e in examples]) for k in transforms.BATCH_KEYS}
    batch["image"] = rng.standard_normal(batch["image"].shape).astype(np.float32)
    batch["masks"] = rng.random(batch["masks"].shape) < 0.5
    batch["datapoint_id"] = np.arange(4, dtype=np.int64) + 2**31 - 4
    batch[transforms.HOST_KEY] = {"simple": np.array(["a", "b", "c", "d"])}
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "fsdp"))
    for axes, shard_rows in ((("data", "fsdp"), 1), ("data", 2)):
      out = make_global_batch(batch, mesh, axes)
      assert set(out) == set(transforms.BATCH_KEYS), set(out)
      for key, array in out.items():
        dtype = np.int32 if batch[key].dtype == np.int64 else batch[key].dtype  # no x64
        assert array.shape == batch[key].shape and array.dtype == dtype, key
        assert array.sharding.spec == P(axes), (key, array.sharding.spec)
        np.testing.assert_array_equal(np.asarray(array), batch[key])
        for shard in array.addressable_shards:
          rows = shard.index[0]
          assert shard.data.shape[0] == shard_rows
          np.testing.assert_array_equal(np.asarray(shard.data), batch[key][rows])
    batch["image_id"][0] = 2**31
    try:
      make_global_batch(batch, mesh)
      raise AssertionError("an id beyond int32 was truncated silently")
    except ValueError as e:
      assert "image_id" in str(e)
    print("ok")
""")


def test_make_global_batch_shards_the_batch_over_data_axes():
  env = dict(os.environ, XLA_FLAGS=xla_flags(4),
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("ok")
