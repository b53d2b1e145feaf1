"""The key lists of Meta's released `sam3.pt` and `sam3.1_multiplex.pt` (tests/data/*_keys.tsv;
origin in tests/data/README.md)."""

import os

DATA = os.path.join(os.path.dirname(__file__), "data")
RELEASED_KEYS_TSV = {"sam3": os.path.join(DATA, "sam3_pt_keys.tsv"),
                     "sam3.1": os.path.join(DATA, "sam3.1_multiplex_keys.tsv")}
DETECTOR = "detector."


def released_sam3_pt(variant: str = "sam3") -> dict[str, tuple[tuple[int, ...], str]]:
  """name -> (shape, dtype) of every tensor in sam3.pt (or, for "sam3.1", sam3.1_multiplex.pt), in
  file order."""
  path = RELEASED_KEYS_TSV[variant]
  table = {}
  with open(path) as f:
    for number, line in enumerate(f, 1):
      fields = line.rstrip("\n").split("\t")
      if len(fields) != 3:
        raise ValueError(f"{path}:{number}: expected name, shape, dtype: {line!r}")
      key, shape, dtype = fields
      table[key] = (tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype)
  return table


def released_image_model() -> dict[str, tuple[tuple[int, ...], str]]:
  """The image model's 1134 tensors: sam3.pt's `detector.*` without the unused `sam2_convs` copy,
  prefix stripped (the keys of Meta's `build_sam3_image_model().state_dict()`)."""
  return {key.removeprefix(DETECTOR): entry for key, entry in released_sam3_pt().items()
          if key.startswith(DETECTOR) and ".sam2_convs." not in key}
