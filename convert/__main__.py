"""Command line:
  python -m convert sam3 --checkpoint PATH/sam3.pt --output DIR [--adapters]
  python -m convert sam3 --checkpoint PATH/sam3.1_multiplex.pt --output DIR   (SAM 3.1; also its
                                                           fp16 safetensors repackage)
  python -m convert hf-sam3 --checkpoint HF_DIR --output DIR  (transformers' Sam3Model.save_pretrained
                                                           directory, or its model.safetensors)
  python -m convert sam3i --checkpoint PATH/checkpoint.pt --output DIR
  python -m convert migrate --input OLD_DIR --output DIR   (a converted directory written before
                                                           layers were stacked -> current layout)
  python -m convert export --model DIR --format {sam3,hf-sam3,sam3i} --output PATH
                           [--dtype float32|bfloat16|float16] [--safetensors]
                           [--tracker-from ORIGINAL.pt] [--drop-adapters]
                                                          (a converted or trained model -> PyTorch)
"""

from __future__ import annotations

import argparse
import sys

from convert.torch_layout import ConversionError


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="kind", required=True)
  sam3 = sub.add_parser("sam3", help="Meta's SAM 3 or SAM 3.1 checkpoint (sam3.pt, sam3.1_multiplex.pt, "
                        "a {'model': ...} dict or safetensors, float32 or 16-bit)")
  sam3.add_argument("--adapters", action="store_true",
                    help="build the SAM3-I model: adapters added at their identity init")
  sam3i = sub.add_parser("sam3i", help="a SAM3-I checkpoint (torch.save dict with 'model')")
  for command in (sam3, sam3i):
    command.add_argument("--checkpoint", required=True, help="path to the .pt (or .safetensors) file")
    command.add_argument("--output", required=True, help="new directory for the converted model")
    command.add_argument("--preset", default="full", help="Sam3Config preset for sizes shapes do not fix")
    command.add_argument("--model-config", help="JSON file of Sam3Config fields overriding the preset")
    command.add_argument("--vocab", help="CLIP BPE vocab file to copy (default: found as the tokenizer does)")
  hf = sub.add_parser("hf-sam3", help="Hugging Face transformers' Sam3Model (save_pretrained "
                      "directory or its model.safetensors; sizes from its config.json)")
  hf.add_argument("--checkpoint", required=True, help="the save_pretrained directory (or model.safetensors)")
  hf.add_argument("--output", required=True, help="new directory for the converted model")
  hf.add_argument("--vocab", help="CLIP BPE vocab file to copy (default: found as the tokenizer does)")
  migrate = sub.add_parser("migrate", help="a converted directory of an earlier layout (per-layer "
                           "parameters) rewritten in the current one (stacked layers)")
  migrate.add_argument("--input", required=True, help="the converted directory to migrate")
  migrate.add_argument("--output", required=True, help="new directory for the migrated model")
  from convert.export import DTYPES, FORMATS
  export = sub.add_parser(
      "export", help="a converted or trained model directory -> a PyTorch layout",
      description="formats:\n" + "\n".join(f"  {name:8s} {text}" for name, text in FORMATS.items()),
      formatter_class=argparse.RawDescriptionHelpFormatter)
  export.add_argument("--model", required=True, help="the converted or trained model directory")
  export.add_argument("--format", required=True, choices=list(FORMATS), help="the layout to write")
  export.add_argument("--output", required=True,
                      help="new file (sam3, sam3i) or directory (hf-sam3)")
  export.add_argument("--dtype", default="float32", choices=DTYPES,
                      help="dtype of the floating-point tensors (default float32)")
  export.add_argument("--safetensors", action="store_true",
                      help="sam3: write a .safetensors file of the same keys (no RoPE tables)")
  export.add_argument("--tracker-from", metavar="ORIGINAL.pt",
                      help="sam3: copy the video tracker, the tracker's neck copies and the unused "
                           "text projection from the checkpoint the model was converted from")
  export.add_argument("--drop-adapters", action="store_true",
                      help="sam3, hf-sam3: leave a SAM3-I model's additions out (refused otherwise)")
  args = parser.parse_args(argv)

  if args.kind == "export":
    from convert.export import export as export_model
    try:
      export_model(args.model, args.format, args.output, dtype=args.dtype,
                   safetensors=args.safetensors, tracker_from=args.tracker_from,
                   drop_adapters=args.drop_adapters)
    except (ConversionError, FileNotFoundError, FileExistsError, ValueError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
    return 0
  if args.kind == "migrate":
    from convert.migrate import migrate_directory
    try:
      migrate_directory(args.input, args.output)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
    return 0
  from convert.hf_sam3 import convert_hf_sam3
  from convert.sam3 import convert_sam3, load_model_config
  from convert.sam3i import convert_sam3i
  try:
    if args.kind == "hf-sam3":
      convert_hf_sam3(args.checkpoint, args.output, vocab_path=args.vocab)
      return 0
    base = load_model_config(args.preset, args.model_config)
    if args.kind == "sam3":
      convert_sam3(args.checkpoint, args.output, base=base, vocab_path=args.vocab, adapters=args.adapters)
    else:
      convert_sam3i(args.checkpoint, args.output, base=base, vocab_path=args.vocab)
  except (ConversionError, FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
