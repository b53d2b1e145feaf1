"""The paper's benchmarks: evaluating a converted SAM3-I model (and fine-tuning it) on each, read in
the layout its authors publish it in.

  python main.py --config=configs/benchmarks.py:<benchmark> --config.mode=eval \\
      --config.init.checkpoint=converted/sam3i --config.data.data_root=/data \\
      [--config.data.eval_split=test] [--config.data.image_roots.coco2014=/data/coco2014]

Benchmarks (BENCHMARKS; docs/evaluation.md, "The paper's benchmarks", maps each published number to
its group here):
  hmpl          HMPL-Instruct's three subsets (SAM3-I's JSON: `<data_root>/HMPL-Instruct_1to1/
                sam3i_val.json`, ...; COCO 2017 images in `data.image_roots.coco2017`), every
                level, kept masks OR-ed;
  refcoco       RefCOCO (SAM3-I's conversion, `<data_root>/RefCOCO/sam3i_val.json`; COCO 2014
                images), the simple level, the top-1 mask as SAM3-I's eval.sh does;
  refzom        Ref-ZOM (the same layout; COCO 2014 images), the simple level, masks OR-ed;
  instructpart  InstructPart as published (`<data_root>/InstructPart/test/{images,masks,
                data_*.json}`, train splits `train/train{200,600,1200,1800}`): the concept level is
                the paper's ORPS setting (the part named), the complex level TRPS (the task);
  reasonseg     ReasonSeg as published (`<data_root>/ReasonSeg/{train,val,test}/<name>.{jpg,json}`):
                the complex level, by query length (`level=complex/kind=short`, `kind=long`),
                ignore regions in neither intersection nor union.
A split is the path under the dataset's folder (InstructPart trains on `train/train1800`;
`--config.data.train_split=train/train200` for a subset). Reported per level and dataset: gIoU
(SAM3-I's convention and LISA's, `gIoU_lisa`), cIoU and P@0.5.

Without `--config.mode=eval` the model is fine-tuned on the train split as a curriculum stage
(stage 3, simple and complex instructions with the alignment losses; ReasonSeg: stage 2, complex
instructions) with all of configs/hmpl.py's machinery and fields, then evaluated.
"""

from __future__ import annotations

from typing import NamedTuple

import ml_collections

import input_pipeline
from configs import hmpl
from input_pipeline.config import HMPL_SUBSETS


class Benchmark(NamedTuple):
  datasets: tuple[tuple[str, str], ...]  # (folder under data_root = metrics name, images)
  format: str  # the reader (input_pipeline.config.ANNOTATION_FORMATS)
  levels: tuple[str, ...]
  train_split: str
  eval_split: str
  stage: int  # the curriculum stage that fine-tunes on it
  combine: str = "union"


BENCHMARKS = {
    "hmpl": Benchmark(tuple((name, "coco2017") for name in HMPL_SUBSETS),
                      "hmpl", ("concept", "simple", "complex"), "train", "val", 3),
    "refcoco": Benchmark((("RefCOCO", "coco2014"),), "hmpl", ("simple",), "train", "val", 3,
                         combine="top1"),
    "refzom": Benchmark((("Ref-ZOM", "coco2014"),), "hmpl", ("simple",), "train", "val", 3),
    "instructpart": Benchmark((("InstructPart", ""),), "instructpart", ("concept", "complex"),
                              "train/train1800", "test", 3),
    "reasonseg": Benchmark((("ReasonSeg", ""),), "reasonseg", ("complex",), "train", "val", 2),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in BENCHMARKS:
    raise ValueError(f"configs/benchmarks.py needs the benchmark: one of {tuple(BENCHMARKS)}, "
                     f"got {arg!r}")
  benchmark = BENCHMARKS[arg]
  config = hmpl.get_config(f"stage={benchmark.stage}")
  config.unlock()
  config.variant = f"benchmarks:{arg}"
  config.workdir = f"runs/{arg}"
  config.data = input_pipeline.default_config("released")
  config.data.datasets = [input_pipeline.dataset_entry(name, images, kind="json",
                                                       format=benchmark.format)
                          for name, images in benchmark.datasets]
  config.data.update(train_split=benchmark.train_split, eval_split=benchmark.eval_split)
  config.eval.update(levels=benchmark.levels, combine=benchmark.combine)
  config.data.batch_size = config.train.global_batch
  config.data.seed = config.get_ref("seed")
  config.lock()
  return config
