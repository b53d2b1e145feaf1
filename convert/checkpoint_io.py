"""Reading PyTorch checkpoints (torch.save dicts or safetensors) lazily, tensor by tensor."""

from __future__ import annotations

import json
import os
import pickle
import struct
from collections.abc import MutableMapping
from typing import Iterator

import numpy as np


class LazyTensor:
  """A tensor of a safetensors file: shape and dtype from the file's header, the data read with a
  plain file read when used (not memory-mapped: a mapped file's pages, once read, would stay in
  the process's resident memory until the converter ends)."""

  _DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
             "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
             "BOOL": "bool"}

  def __init__(self, path: str, dtype: str, shape: list[int], start: int, end: int):
    if dtype not in self._DTYPES:
      raise ValueError(f"{path}: tensor dtype {dtype} is not supported")
    self.path, self.dtype, self.shape = path, self._DTYPES[dtype], tuple(shape)
    self._start, self._end = start, end

  def load(self):
    import torch
    with open(self.path, "rb") as f:
      f.seek(self._start)
      data = bytearray(f.read(self._end - self._start))
    if len(data) != self._end - self._start:
      raise ValueError(f"{self.path}: truncated (a tensor's bytes end past the file)")
    dtype = getattr(torch, self.dtype)
    if not data:
      return torch.empty(self.shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).reshape(self.shape)


def _read_safetensors(path: str) -> dict[str, LazyTensor]:
  """The tensors of a safetensors file (8-byte little-endian header size, a JSON header of
  {name: {"dtype", "shape", "data_offsets"}}, then the data), unread."""
  with open(path, "rb") as f:
    size = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(size))
  base = 8 + size
  return {key: LazyTensor(path, entry["dtype"], entry["shape"], base + entry["data_offsets"][0],
                          base + entry["data_offsets"][1])
          for key, entry in header.items() if key != "__metadata__"}


class TensorStore(MutableMapping):
  """{key: numpy array} over a checkpoint, converting each tensor only when it is read.

  Deleting a key drops the tensor, so a converter that consumes keys never holds the whole
  checkpoint twice.
  """

  def __init__(self, tensors: dict, source: str):
    self._tensors = tensors
    self.source = source

  def __getitem__(self, key: str) -> np.ndarray:
    t = self.raw(key)
    if hasattr(t, "detach"):  # torch.Tensor
      import torch
      t = t.detach()
      if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
      return t.cpu().numpy()
    return np.asarray(t)

  def __contains__(self, key) -> bool:  # without reading the tensor, as Mapping's would
    return key in self._tensors

  def raw(self, key: str):
    """The tensor as stored (torch or numpy), not converted (read now from a safetensors file)."""
    t = self._tensors[key]
    return t.load() if isinstance(t, LazyTensor) else t

  def stored(self, key: str):
    """What holds the tensor, unread: a tensor, or a LazyTensor of a safetensors file."""
    return self._tensors[key]

  def __setitem__(self, key, value):
    self._tensors[key] = value

  def __delitem__(self, key: str) -> None:
    del self._tensors[key]

  def __iter__(self) -> Iterator[str]:
    return iter(list(self._tensors))

  def __len__(self) -> int:
    return len(self._tensors)

  def dtypes(self) -> dict[str, int]:
    """{dtype name as stored: number of tensors}, e.g. {"float16": 1133} (reads no data)."""
    counts: dict[str, int] = {}
    for t in self._tensors.values():
      name = str(t.dtype).removeprefix("torch.")
      counts[name] = counts.get(name, 0) + 1
    return counts

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._tensors[key].shape)

  def rename(self, mapping) -> "TensorStore":
    """A store with keys renamed by `mapping(key) -> new key` (shares tensors)."""
    return TensorStore({mapping(k): v for k, v in self._tensors.items()}, self.source)


def read_checkpoint(path: str, *, mmap: bool = False) -> TensorStore:
  """Opens a `torch.save` dict (optionally wrapped as {"model": {...}}) or a .safetensors file.

  mmap: map a `torch.save` file instead of loading it, for reading a few of its tensors (a
  .safetensors file's tensors are always read one by one, when used)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  if path.endswith(".safetensors"):
    try:
      return TensorStore(_read_safetensors(path), path)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
      raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
  try:
    import torch
  except ImportError as e:
    raise ImportError("reading PyTorch checkpoints needs torch: pip install 'sam3i-jax[convert]'") from e
  # Not mmap by default: pages of a mapped file stay resident once read, whereas separately loaded
  # tensors are freed one by one as the converter consumes them.
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
  except pickle.UnpicklingError as e:
    raise ValueError(
        f"{path} holds Python objects other than tensors and plain containers, which are not loaded "
        "(a pickle can run code). If you trust the file, save its weights alone first: "
        "torch.save(torch.load(PATH, weights_only=False)['model'], 'weights.pt')") from e
  if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
    obj = obj["model"]
  if not isinstance(obj, dict) or not obj:
    raise ValueError(f"{path}: expected a state dict (or {{'model': state dict}}), got {type(obj).__name__}")
  bad = [k for k, v in obj.items() if not hasattr(v, "shape")]
  if bad:
    raise ValueError(f"{path}: entries that are not tensors: {bad[:10]}")
  return TensorStore(dict(obj), path)
