"""Build the ArrayRecord shards of one dataset with the TFDS builder.

  python -m input_pipeline.build --dataset HMPL-Instruct_1to1 \\
      --json train=/data/sam3i_datasets/HMPL-Instruct_1to1/sam3i_train.json \\
      --json val=/data/sam3i_datasets/HMPL-Instruct_1to1/sam3i_val.json \\
      --images /data/coco2017 --out /data/tfds

  python -m input_pipeline.build --format coco --dataset my_parts \\
      --json train=annotations/instances_train.json --json val=annotations/instances_val.json \\
      --images /data/my_parts/images --out /data/tfds [--negatives 0.5]

  python -m input_pipeline.build --format reasonseg --dataset ReasonSeg \\
      --json train=/data/ReasonSeg/train --json val=/data/ReasonSeg/val --out /data/tfds
  python -m input_pipeline.build --format instructpart --dataset InstructPart \\
      --json train=/data/InstructPart/train/train1800/<its data_*.json> --out /data/tfds

(ReasonSeg: a split is its folder of JPEG + JSON pairs; InstructPart: a split's data JSON, with
its images/ and masks/ folders beside it.)

Writes `<out>/sam3i_instruct/<config>/<version>/` (config = the dataset name in snake case, e.g.
hmpl_instruct_1to1) with TFDS's progress bars, then prints what was skipped. Point the pipeline
config's `tfds_data_dir` at `<out>` and use kind="tfds" for the dataset. Exit status 1, with the
file and record named, on bad input under --bad-input=error (the default); nothing is left
behind in that case.
"""

from __future__ import annotations

import argparse
import sys

from input_pipeline import config as config_lib
from input_pipeline import hmpl


def _split_path(text: str) -> tuple[str, str]:
  split, eq, path = text.partition("=")
  if not eq or not split or not path:
    raise argparse.ArgumentTypeError(f"expected SPLIT=PATH, got {text!r}")
  return split, path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m input_pipeline.build",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--dataset", required=True,
                      help="dataset name, e.g. HMPL-Instruct_1to1 or RefCOCO")
  parser.add_argument("--json", action="append", type=_split_path, default=[],
                      metavar="SPLIT=PATH", help="an annotation file per split (repeat)")
  parser.add_argument("--manual-dir", default=None,
                      help="instead of --json: SAM3-I's layout, DIR/<dataset>/sam3i_<split>.json "
                      "(COCO: DIR/<dataset>/instances_<split>.json)")
  parser.add_argument("--images", default=None, help="folder that file_name entries are "
                      "relative to (default with --manual-dir: DIR/images)")
  parser.add_argument("--out", required=True, help="TFDS data_dir to write into")
  parser.add_argument("--format", choices=config_lib.ANNOTATION_FORMATS, default="hmpl",
                      help="the JSON files' format: SAM3-I's HMPL-Instruct or COCO instances")
  parser.add_argument("--negatives", type=float, default=1.0,
                      help="COCO: the share (0 to 1) of the categories absent from an image "
                      "prompted as negatives in the train split (other splits: all)")
  parser.add_argument("--seed", type=int, default=0,
                      help="COCO: the seed of the negatives' choice")
  parser.add_argument("--bad-input", choices=hmpl.BAD_INPUT_POLICIES, default="error")
  parser.add_argument("--context-length", type=int, default=32,
                      help="text encoder context, for the over-long instruction check")
  parser.add_argument("--overlong", choices=("truncate", "invalid"), default="truncate")
  parser.add_argument("--non-ascii", choices=("keep", "invalid"), default="keep")
  args = parser.parse_args(argv)
  if bool(args.json) == bool(args.manual_dir):
    parser.error("give either --json SPLIT=PATH (with --images) or --manual-dir")
  if args.json and not args.images and args.format not in config_lib.IMAGES_BESIDE:
    parser.error("--images is required with --json (but for formats whose images lie beside "
                 f"their annotations: {', '.join(config_lib.IMAGES_BESIDE)})")
  if not 0.0 <= args.negatives <= 1.0:
    parser.error(f"--negatives must be a share in [0, 1], got {args.negatives}")
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  import tensorflow_datasets as tfds  # after argument parsing: --help stays fast
  from input_pipeline import tfds_builder

  builder = tfds_builder.Sam3iInstruct(
      config=tfds_builder.builder_config(args.dataset), data_dir=args.out,
      json_files=dict(args.json) or None, image_root=args.images, bad_input=args.bad_input,
      annotation_format=args.format, negatives=args.negatives, seed=args.seed,
      text_rules=hmpl.TextRules(context_length=args.context_length, overlong=args.overlong,
                                non_ascii=args.non_ascii))
  download_config = tfds.download.DownloadConfig(manual_dir=args.manual_dir)
  try:
    builder.download_and_prepare(download_config=download_config)
  except hmpl.BadInputError as e:
    print(f"error: {e}\nnothing was written (use --bad-input=skip to skip and count such "
          "records)", file=sys.stderr)
    return 1
  for split, report in builder.reports.items():
    print(f"{split}: {builder.info.splits[split].num_examples} examples; {report}")
  print(builder.data_dir)
  return 0


if __name__ == "__main__":
  sys.exit(main())
