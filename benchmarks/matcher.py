"""One-to-one matcher cost at the released step shapes: the old matcher and the new one, one run.

  python benchmarks/matcher.py [--problems 22 44] [--valid 0 1 5 20 50 200] [--repeats 5]
                               [--output benchmarks/results/matcher.json]

One call of `hungarian_match` (cost matrix and assignment, jitted, on this process's default
device) with the shapes of one instruction level of a training step at the released settings:
Q = 200 queries, T = 200 target slots, and P problems = examples x 11 Hungarian branches (the last
decoder layer and its 5 aux layers' one-to-one queries, and the 5 aux layers' one-to-many
queries): 22 for a stage-3 step at 2 examples per chip, 44 for a stage-1 or stage-2 step at 4.
Each image has exactly `valid` real targets, scattered over the 200 slots.

  old   the matcher before issue 22: `optax.assignment.hungarian_algorithm` vmapped over the
        problems, on the full (Q, T) cost with padded columns set to 0 (as it was in
        sam3i_jax/losses/matcher.py);
  new   `sam3i_jax.losses.matcher.hungarian_match` (valid slots packed into the smallest size
        that holds them, shortest augmenting paths over the valid targets only).

Inputs: random logits and boxes ("random", the harder case: every query is a plausible match) and,
for the new matcher, predictions scattered around the GT boxes as a trained model makes them
("near"). Reported: the median wall and CPU milliseconds of `--repeats` calls after one warm-up
call (compile excluded), with the 1-minute load average; prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

NUM_QUERIES = 200
NUM_SLOTS = 200


def old_hungarian_match(pred_logits, pred_boxes, gt_boxes, gt_valid):
  """The previous matcher's assignment (query_for_gt), for comparison only."""
  import jax
  import jax.numpy as jnp
  import optax

  from sam3i_jax.losses.matcher import hungarian_cost

  cost = hungarian_cost(*jax.lax.stop_gradient((pred_logits, pred_boxes, gt_boxes)))

  def solve_one(cost, valid):
    cost = jnp.nan_to_num(cost, nan=1e6, posinf=1e6, neginf=-1e6)
    rows, cols = optax.assignment.hungarian_algorithm(jnp.where(valid[None, :], cost, 0.0))
    query_for_gt = jnp.zeros(cost.shape[1], jnp.int32).at[cols].set(rows.astype(jnp.int32))
    return jnp.where(valid, query_for_gt, -1)

  return jax.vmap(solve_one)(cost, gt_valid)


def _inputs(rng, problems: int, valid: int, near: bool):
  import numpy as np

  def boxes(shape):
    centre = rng.uniform(0.2, 0.8, shape + (2,))
    size = rng.uniform(0.02, 0.4, shape + (2,))
    return np.concatenate([centre, size], -1).astype(np.float32)

  logits = (2 * rng.normal(size=(problems, NUM_QUERIES, 1))).astype(np.float32)
  gt = boxes((problems, NUM_SLOTS))
  mask = np.zeros((problems, NUM_SLOTS), bool)
  for p in range(problems):
    mask[p, rng.permutation(NUM_SLOTS)[:valid]] = True
  if near:  # each query near one of its image's valid GT boxes (any GT if none is valid)
    pred = np.empty((problems, NUM_QUERIES, 4), np.float32)
    for p in range(problems):
      source = gt[p, np.flatnonzero(mask[p])] if valid else gt[p]
      pred[p] = source[rng.integers(0, len(source), NUM_QUERIES)]
    pred[..., :2] += rng.normal(0, 0.03, pred[..., :2].shape)
    pred[..., 2:] *= rng.uniform(0.7, 1.3, pred[..., 2:].shape)
  else:
    pred = boxes((problems, NUM_QUERIES))
  return logits, pred, gt, mask


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--problems", nargs="*", type=int, default=[22, 44])
  parser.add_argument("--valid", nargs="*", type=int, default=[0, 1, 5, 20, 50, 200])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--skip-old", action="store_true", help="time the new matcher only")
  parser.add_argument("--output", default=os.path.join(common.ROOT, "benchmarks", "results",
                                                       "matcher.json"))
  args = parser.parse_args()

  import jax
  import numpy as np

  from sam3i_jax.losses.matcher import hungarian_match

  new = jax.jit(lambda *a: hungarian_match(*a).query_for_gt)
  old = jax.jit(old_hungarian_match)
  rng = np.random.default_rng(0)
  runs = []
  print(f"{'problems':>8s} {'valid':>5s} {'inputs':>6s} {'matcher':>7s} {'wall ms':>8s} "
        f"{'cpu ms':>8s} {'load':>5s}")
  for problems in args.problems:
    for valid in args.valid:
      for near in (False, True):
        inputs = _inputs(rng, problems, valid, near)
        for name, fn in (("old", old), ("new", new)):
          if name == "old" and (near or args.skip_old):
            continue
          wall, cpu = common.median_call_ms(fn, inputs, args.repeats)
          run = {"problems": problems, "queries": NUM_QUERIES, "slots": NUM_SLOTS,
                 "valid": valid, "inputs": "near" if near else "random", "matcher": name,
                 "wall_ms": wall, "cpu_ms": cpu, "load_average_1min": os.getloadavg()[0]}
          runs.append(run)
          print(f"{problems:8d} {valid:5d} {run['inputs']:>6s} {name:>7s} {wall:8.1f} {cpu:8.1f} "
                f"{run['load_average_1min']:5.2f}", flush=True)
  import flax
  record = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "machine": common.machine(jax=jax.__version__, flax=flax.__version__,
                                device=str(jax.devices()[0].device_kind)),
      "repeats": args.repeats, "runs": runs,
  }
  common.write_json(record, args.output)


if __name__ == "__main__":
  main()
