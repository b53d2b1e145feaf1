"""The batched exact assignment solver against scipy's linear_sum_assignment, on thousands of
random problems, and the properties the training step relies on (work follows the valid rows; no
scatter or host callback inside the loop)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from sam3i_jax.losses import assignment

_solve = jax.jit(assignment.solve)


def _random_valid(rng, num_problems, num_rows):
  """Scattered valid rows: per problem a random density, with none, one and all among them."""
  density = rng.uniform(size=(num_problems, 1))
  valid = rng.uniform(size=(num_problems, num_rows)) < density
  valid[0::7] = False
  valid[1::7] = False
  valid[1::7, rng.integers(0, num_rows)] = True
  valid[2::7] = True
  return valid


def _check_against_scipy(cost, row_valid, col_valid=None, exact=False):
  col_for_row, row_for_col, _ = (np.asarray(x) for x in _solve(cost, row_valid, col_valid))
  cost = np.asarray(cost, np.float64)
  if col_valid is None:
    col_valid = np.ones(cost.shape[::2], bool)
  for p in range(cost.shape[0]):
    rows, cols = np.flatnonzero(row_valid[p]), np.flatnonzero(col_valid[p])
    assert (col_for_row[p][~row_valid[p]] == -1).all()
    chosen = col_for_row[p][rows]
    assert np.isin(chosen, cols).all() and len(set(chosen.tolist())) == len(rows)
    np.testing.assert_array_equal(np.flatnonzero(row_for_col[p] >= 0), np.sort(chosen))
    np.testing.assert_array_equal(row_for_col[p][chosen], rows)
    ours = cost[p, rows, chosen].sum()
    r, c = linear_sum_assignment(cost[p][np.ix_(rows, cols)])
    best = cost[p][np.ix_(rows, cols)][r, c].sum()
    if exact:
      assert ours == best, (p, ours, best)
    else:
      np.testing.assert_allclose(ours, best, rtol=1e-5, atol=1e-4, err_msg=f"problem {p}")


@pytest.mark.parametrize("rows,cols", [(7, 9), (12, 12), (1, 5)])
def test_optimum_equals_scipy_on_random_costs(rows, cols):
  rng = np.random.default_rng(rows * 100 + cols)
  cost = rng.normal(size=(700, rows, cols)).astype(np.float32)
  _check_against_scipy(cost, _random_valid(rng, 700, rows))


@pytest.mark.parametrize("rows,cols", [(10, 10), (6, 15)])
def test_optimum_equals_scipy_with_near_ties(rows, cols):
  """Costs on a coarse integer grid: many tied paths and optima; float32 sums are exact."""
  rng = np.random.default_rng(rows + cols)
  cost = rng.integers(0, 4, size=(700, rows, cols)).astype(np.float32)
  _check_against_scipy(cost, _random_valid(rng, 700, rows), exact=True)


def test_excluded_columns_are_never_taken():
  rng = np.random.default_rng(3)
  cost = rng.normal(size=(300, 6, 10)).astype(np.float32)
  col_valid = rng.uniform(size=(300, 10)) < 0.7
  col_valid[:, :6] = True  # at least as many valid columns as rows
  cost = np.where(col_valid[:, None], cost, -100.0).astype(np.float32)  # tempting, but excluded
  _check_against_scipy(cost, _random_valid(rng, 300, 6), col_valid)


def test_padded_rows_cost_no_steps():
  """The same valid rows among 5 or 60 padded ones (scattered): same steps, same assignment."""
  rng = np.random.default_rng(4)
  small = rng.normal(size=(8, 5, 40)).astype(np.float32)
  big = rng.normal(size=(8, 65, 40)).astype(np.float32)
  where = np.sort(rng.permutation(65)[:5])
  big[:, where] = small
  valid_big = np.zeros((8, 65), bool)
  valid_big[:, where] = True
  col_small, _, steps_small = _solve(small, np.ones((8, 5), bool))
  col_big, _, steps_big = _solve(big, valid_big)
  assert int(steps_small) == int(steps_big) > 0
  np.testing.assert_array_equal(np.asarray(col_big)[:, where], col_small)


def _primitives(jaxpr) -> set[str]:
  """Every primitive name in a jaxpr, nested ones included."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for sub in jax.core.jaxprs_in_params(eqn.params):
      names |= _primitives(sub)
  return names


def test_loop_body_has_no_scatter_and_no_callback():
  """Vmapped scatters in loops can run as per-problem sequential loops on TPU, and a host
  round trip in every step would stall a pod: neither may appear inside the solver's loop."""
  jaxpr = jax.make_jaxpr(assignment.solve)(jnp.zeros((4, 6, 9)), jnp.ones((4, 6), bool))
  loops = [eqn for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "while"]
  assert len(loops) == 1
  inside = _primitives(loops[0].params["body_jaxpr"].jaxpr)
  inside |= _primitives(loops[0].params["cond_jaxpr"].jaxpr)
  assert not {name for name in inside if "scatter" in name or "callback" in name}, inside
  assert {"gather", "reduce_min"} <= inside  # the walk does see the body's operations
