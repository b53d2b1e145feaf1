"""grain pipelines: training (mix, shuffle, repeat, transform, shard, batch, prefetch) and eval.

Training order of operations (all MapDataset steps are lazy index arithmetic):
  sources -> concatenate (or shuffle + repeat each, then mix by weight) -> shuffle -> repeat
  -> random_map(TrainTransform) -> HostBlocks(process_index, process_count)
  -> to_iter_dataset -> batch(batch_size, drop_remainder) -> mp_prefetch(worker_count)
The per-example RNG is seeded by the element's index in the global (unsharded) sequence. Every
process builds the same global sequence, cut into global batches of process_count * batch_size
consecutive elements, and reads its own block of batch_size of each: processes read disjoint
examples, and `make_global_batch` (host batches concatenated in process order) gives the same
global batches, in the same order, on any number of processes.
The iterator is a grain `DatasetIterator`: `get_state()` / `set_state()` resume exactly (with
the same config and worker count); orbax saves it through grain's checkpoint handler.

Eval: every sample once, in order, padded with `example_valid=False` examples to a whole number
of batches on every process (hosts must run the same number of steps).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

import grain
import ml_collections

from input_pipeline import config as config_lib
from input_pipeline import hmpl
from input_pipeline import sources as sources_lib
from input_pipeline import transforms


@dataclasses.dataclass
class Pipeline:
  """A grain dataset of host batches and what reading its sources found."""

  dataset: grain.IterDataset
  report: hmpl.InputReport
  lengths: dict[str, int]  # records per dataset
  num_batches: int | None = None  # batches per process (eval); None = endless

  def iterator(self) -> grain.DatasetIterator:
    return iter(self.dataset)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # only when the caller leaves it to JAX
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return process_index, process_count


class HostBlocks(grain.MapDataset):
  """Process `index` of `count`'s share of `parent`: of each run of `count * batch` consecutive
  elements (one global batch), the `batch` elements at offset `index * batch`. A trailing
  incomplete global batch is left out (every process must run the same number of steps)."""

  def __init__(self, parent: grain.MapDataset, batch: int, index: int, count: int):
    super().__init__(parent)
    self._batch, self._index, self._count = batch, index, count
    self._length = len(parent) // (batch * count) * batch

  def __len__(self) -> int:
    return self._length

  def parent_index(self, index: int) -> int:
    block, offset = divmod(index, self._batch)
    return (block * self._count + self._index) * self._batch + offset

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self.parent_index(index)]

  def __str__(self) -> str:
    return f"HostBlocks(batch={self._batch}, process {self._index} of {self._count})"


def _image_root(config: ml_collections.ConfigDict, images: str) -> str:
  root = config.image_roots[images] if images in config.image_roots else images
  if not root:
    raise ValueError(f"image folder {images!r} is not set (config.image_roots.{images})")
  return root if os.path.isabs(root) else os.path.join(config.data_root, root)


def open_source(config: ml_collections.ConfigDict, entry: Any, split: str,
                context_length: int):
  """The JsonSource or TfdsSource of one dataset entry and split.

  `context_length` (the text encoder's) decides which instructions are over-long.
  """
  if entry.kind == "json":
    path = entry.files.get(split) or config_lib.layout_file(
        os.path.join(config.data_root, entry.name), entry.format, split)
    rules = hmpl.TextRules(context_length=context_length,
                           overlong=config.overlong_instructions,
                           non_ascii=config.non_ascii_instructions, vocab_path=config.vocab_path)
    images = None if entry.format in config_lib.IMAGES_BESIDE else _image_root(config, entry.images)
    return sources_lib.JsonSource(
        path, images, format=entry.format, bad_input=config.bad_input,
        check_images=config.check_images, text_rules=rules,
        negatives=entry.negatives if split == config.train_split else 1.0, seed=config.seed)
  if entry.kind == "tfds":
    if not config.tfds_data_dir:
      raise ValueError("config.tfds_data_dir is not set (the --out of input_pipeline.build)")
    return sources_lib.TfdsSource(sources_lib.tfds_config_name(entry.name), split,
                                  config.tfds_data_dir)
  raise ValueError(f"dataset {entry.name}: unknown kind {entry.kind!r}")


def _open_all(config: ml_collections.ConfigDict, split: str, names: Sequence[str] | None,
              context_length: int) -> tuple[list[Any], list[Any], hmpl.InputReport]:
  if config.generate_demo:
    from input_pipeline import demo_data
    demo_data.ensure_demo_data(config.data_root)
  entries = [e for e in config.datasets if names is None or e.name in names]
  if not entries:
    raise ValueError(f"no datasets selected (names={names}, config has "
                     f"{[e.name for e in config.datasets]})")
  report = hmpl.InputReport(config.bad_input)
  opened = []
  for entry in entries:
    source = open_source(config, entry, split, context_length)
    report.merge(source.report)
    opened.append(source)
  return entries, opened, report


def _spec(config: ml_collections.ConfigDict, model_config: Any) -> transforms.ExampleSpec:
  if not 1 <= config.max_targets <= 200:
    raise ValueError(f"max_targets must be in [1, 200], got {config.max_targets}")
  return transforms.ExampleSpec.from_model_config(model_config, config.max_targets)


def _prefetch(dataset: grain.IterDataset, config: ml_collections.ConfigDict) -> grain.IterDataset:
  if config.worker_count <= 0:
    return dataset
  from absl import flags
  if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app use defaults
    flags.FLAGS.mark_as_parsed()
  return dataset.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size))


def _read_options(config: ml_collections.ConfigDict) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.read_buffer)


def train_pipeline(config: ml_collections.ConfigDict, model_config: Any, *,
                   process_index: int | None = None,
                   process_count: int | None = None) -> Pipeline:
  """Endless (or `num_epochs`) per-host training batches of `config.batch_size` examples."""
  process_index, process_count = _process(process_index, process_count)
  spec = _spec(config, model_config)
  entries, opened, report = _open_all(config, config.train_split, None, spec.context_length)
  datasets = [grain.MapDataset.source(s) for s in opened]
  weights = [e.weight for e in entries]
  seed = config.seed
  if all(w is None for w in weights):
    mixed = grain.MapDataset.concatenate(datasets) if len(datasets) > 1 else datasets[0]
    if config.shuffle:
      mixed = mixed.shuffle(seed=seed)
    mixed = mixed.repeat(config.num_epochs)
  elif any(w is None for w in weights) or any(w <= 0 for w in weights):
    raise ValueError(f"dataset weights must be all None or all > 0, got {weights}")
  elif config.num_epochs is not None:
    raise ValueError("num_epochs must be None when datasets are mixed by weight")
  else:
    parts = [(d.shuffle(seed=seed + i) if config.shuffle else d).repeat()
             for i, d in enumerate(datasets)]
    mixed = grain.MapDataset.mix(parts, weights=weights)
  transform = transforms.TrainTransform(
      spec, sizes=tuple(config.train_sizes) if config.train_sizes else None,
      concept_choice=config.concept_choice, bad_input=config.bad_input,
      vocab_path=config.vocab_path)
  dataset = HostBlocks(mixed.random_map(transform, seed=seed), config.batch_size, process_index,
                       process_count)
  dataset = dataset.to_iter_dataset(_read_options(config))
  dataset = dataset.batch(config.batch_size, drop_remainder=True)
  return Pipeline(_prefetch(dataset, config), report,
                  {e.name: len(s) for e, s in zip(entries, opened)})


class _EvalItems:
  """Random access to eval samples: (dataset, record, concept) triples, None for padding."""

  def __init__(self, opened: Sequence[Any], names: Sequence[str],
               items: Sequence[tuple[int, int, int] | None]):
    self.opened, self.names, self.items = list(opened), list(names), list(items)

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, index: int) -> transforms.EvalItem:
    item = self.items[index]
    if item is None:
      return transforms.EvalItem(None)
    dataset, record, concept = item
    return transforms.EvalItem(self.opened[dataset][record], concept, self.names[dataset])


def eval_pipeline(config: ml_collections.ConfigDict, model_config: Any, *,
                  datasets: Sequence[str] | None = None, process_index: int | None = None,
                  process_count: int | None = None) -> Pipeline:
  """Each sample of the eval split of `datasets` (names; None = all) exactly once, in order.

  Batches carry the strings used under `transforms.HOST_KEY`; padding examples have
  example_valid=False and datapoint_id=-1.
  """
  process_index, process_count = _process(process_index, process_count)
  spec = _spec(config, model_config)
  entries, opened, report = _open_all(config, config.eval_split, datasets, spec.context_length)
  items: list[tuple[int, int, int] | None] = []
  for d, source in enumerate(opened):
    if config.expand_concepts:
      items += [(d, r, c) for r, n in enumerate(source.concept_counts()) for c in range(n)]
    else:
      items += [(d, r, 0) for r in range(len(source))]
  batch = config.eval_batch_size
  per_process = math.ceil(len(items) / (batch * process_count)) * batch
  items += [None] * (per_process * process_count - len(items))
  transform = transforms.EvalTransform(spec, bad_input=config.bad_input,
                                       vocab_path=config.vocab_path)
  dataset = grain.MapDataset.source(_EvalItems(opened, [e.name for e in entries], items)).map(transform)
  dataset = HostBlocks(dataset, batch, process_index, process_count).to_iter_dataset(
      _read_options(config))
  dataset = dataset.batch(batch, drop_remainder=False)
  return Pipeline(_prefetch(dataset, config), report,
                  {e.name: len(s) for e, s in zip(entries, opened)},
                  num_batches=per_process // batch)
