"""Dotted names of pytree leaves: the same strings as PyTorch state-dict keys (see convert/)."""

from __future__ import annotations

import jax


def dotted(path) -> str:
  """A jax key path -> 'a.b.0.kernel', dropping attribute keys such as an nnx Variable's value."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
  return ".".join(parts)
