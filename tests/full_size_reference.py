"""Writes a full-size random-weight `sam3.pt` and `sam3.1_multiplex.pt` (released key layouts) and
Meta's outputs on the SAM 3 model.

Run in a subprocess so the PyTorch model's ~10 GB are freed before the Flax side is built:
  python tests/full_size_reference.py OUTDIR
OUTDIR/sam3.pt: `detector.*` image-model tensors (+ `sam2_convs` copy) and random `tracker.*` tensors
with the shapes of tests/data/sam3_pt_keys.tsv; OUTDIR/sam3.1_multiplex.pt: the same weights in SAM
3.1's layout (tests/data/sam3.1_multiplex_keys.tsv). OUTDIR/reference.npz: the outputs of
`forward_grounding` for a text prompt and for text + 2 boxes on an image no other test uses.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import sam3_cpu  # noqa: E402  (before torch users)
from released_keys import released_sam3_pt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

IMAGE_SEED = 20261124
TEXT = "the helmet of the rider on the black horse"
BOXES = [[0.45, 0.55, 0.3, 0.4], [0.8, 0.2, 0.5, 0.3]]  # the second crosses the image border
BOX_LABELS = [True, False]
OUTPUT_KEYS = ("pred_logits", "pred_boxes", "pred_boxes_xyxy", "pred_masks", "semantic_seg",
               "presence_logit_dec", "queries", "input.text_tokens")


def released_layout(model, variant: str = "sam3") -> dict:
  """The image model's state dict laid out as the released checkpoint of `variant` holds it, under
  `detector.`: sam3.pt (plus its `sam2_convs` neck copy and the tracker) or sam3.1_multiplex.pt
  (without the neck's 0.5x branch `convs.3`, plus the tracker's `interactive_convs` and
  `propagation_convs` neck branches and the tracker under `tracker.model.`). Tensors the image model
  does not have are random, at the image model's sizes for neck branches and at the released
  shapes for the tracker, whatever the image model's size."""
  released = released_sam3_pt(variant)
  gen = torch.Generator().manual_seed(1)
  sd = {f"detector.{k}": v for k, v in model.state_dict().items()
        if variant == "sam3" or ".vision_backbone.convs.3." not in k}
  for key, (shape, _) in released.items():
    if key in sd:
      continue
    if ".sam2_convs." in key:
      sd[key] = sd[key.replace(".sam2_convs.", ".convs.")].clone()
    elif ".interactive_convs." in key or ".propagation_convs." in key:
      like = sd[key.replace(".interactive_convs.", ".convs.").replace(".propagation_convs.", ".convs.")]
      sd[key] = torch.randn(like.shape, generator=gen) * 0.02
    elif key.startswith("tracker."):
      sd[key] = torch.randn(shape, generator=gen) * 0.02
  return sd


def main(outdir: str) -> None:
  torch.set_num_threads(os.cpu_count() or 1)
  t = time.time()
  model = sam3_cpu.build_full(seed=0, perturb=0.02)
  print(f"built full model in {time.time() - t:.1f}s", flush=True)
  for variant, name in (("sam3", "sam3.pt"), ("sam3.1", "sam3.1_multiplex.pt")):
    torch.save(released_layout(model, variant), os.path.join(outdir, name))
  image = np.random.default_rng(IMAGE_SEED).uniform(-1, 1, (1, 3, 1008, 1008)).astype(np.float32)
  results = {"image": image}
  t = time.time()
  encoded = sam3_cpu.encode_image(model, image)
  text = sam3_cpu.run_text(model, image, TEXT, encoded=encoded)
  results.update({f"text/{k}": text[k] for k in OUTPUT_KEYS})
  del text
  print(f"image and text forward {time.time() - t:.1f}s", flush=True)
  t = time.time()
  box = sam3_cpu.run_text_box(model, image, TEXT, BOXES, labels=BOX_LABELS, encoded=encoded)
  results.update({f"box/{k}": box[k] for k in OUTPUT_KEYS})
  print(f"text+box forward on the same image features {time.time() - t:.1f}s", flush=True)
  np.savez(os.path.join(outdir, "reference.npz"), **results)


if __name__ == "__main__":
  main(sys.argv[1])
