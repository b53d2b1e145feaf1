"""Entry point: `python main.py --config=configs/hmpl.py[:arg] [--config.field=value ...]`.

See configs/hmpl.py for the variants (default: the released recipe, demo, smoke, eval).
On several hosts (a TPU pod slice, multi-node GPUs) pass --multihost on every host: it calls
`jax.distributed.initialize()` before anything touches a device. The cluster comes from the
environment (TPU pods, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS) or from --coordinator_address,
--num_processes and --process_id, e.g. two processes on one machine:
  python main.py --config=configs/hmpl.py:smoke --multihost --num_processes=2
      --coordinator_address=127.0.0.1:5432 --process_id=0   (and --process_id=1 in a second shell)
"""

import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/hmpl.py", "training configuration")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() first")
# Unset, jax.distributed.initialize reads them from the environment: JAX_COORDINATOR_ADDRESS, or
# the cluster's own variables (TPU pod metadata, SLURM, Open MPI, ...).
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "with --multihost: HOST:PORT of process 0's coordinator")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "with --multihost: processes in all")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "with --multihost: this process's index")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  import jax
  cluster = {"coordinator_address": _COORDINATOR.value, "num_processes": _NUM_PROCESSES.value,
             "process_id": _PROCESS_ID.value}
  if _MULTIHOST.value:
    jax.distributed.initialize(**cluster)
    # All processes have just joined: a first collective now sets up the collectives' context
    # among them (CPU's gloo allows a late peer 30 s there; processes drift apart later, e.g.
    # while compiling on a loaded machine).
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("main.py: all processes joined")
  elif any(value is not None for value in cluster.values()):
    raise app.UsageError("--coordinator_address, --num_processes and --process_id need --multihost")
  from sam3i_jax.train import loop
  from sam3i_jax.train.config_checks import ConfigError
  from sam3i_jax.train.sharding import MeshShapeError
  try:
    loop.run(_CONFIG.value)
  except MeshShapeError as error:  # one line, before anything compiles (no usage dump)
    sys.exit(f"error: --config.mesh.shape: {error}")
  except ConfigError as error:
    sys.exit(f"error: {error}")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a `--config.<path>=...` override that names no field of the config
  (ml_collections raises a bare AttributeError/KeyError with the missing name) reported as such."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as error:
    text = str(error).encode().decode("unicode_escape")
    missing = re.search(r"[A-Za-z_]\w*", text).group()
    hint = re.search(r"Did you mean [^?]*\?", text)
    overrides = [arg for arg in argv[1:] if arg.startswith("--config.")
                 and missing in arg.split("=", 1)[0].split(".")]
    app.usage(shorthelp=True, exitcode=2, detailed_error=(
        f"unknown config field {missing!r} in {' '.join(overrides) or 'the --config overrides'}"
        f"{'; ' + hint.group() if hint else ''}"))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
