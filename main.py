"""Entry point: `python main.py --config=configs/hmpl.py[:arg] [--config.field=value ...]`.

See configs/hmpl.py for the variants (default: the released recipe, demo, smoke, eval).
On several hosts (a TPU pod slice, multi-node GPUs) pass --multihost on every host: it calls
`jax.distributed.initialize()` (which reads the cluster from the environment) before anything
touches a device.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/hmpl.py", "training configuration")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() first")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  import jax
  if _MULTIHOST.value:
    jax.distributed.initialize()
  from sam3i_jax.train import loop
  loop.run(_CONFIG.value)


if __name__ == "__main__":
  app.run(main)
