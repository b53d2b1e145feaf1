"""A SAM3-I training checkpoint (`torch.save` dict whose "model" is the state dict) -> a converted
directory that load_pretrained reads (the SAM3-I model: Sam3Config.adapters=True).

Besides SAM 3's tensors (no `detector.` prefix here) the state dict holds the adapters, the
mask-predictor copies and, from stage 3 on, the projection head. Knowingly not converted:
- `backbone.text.*`: a second text encoder that model_builder._replace_text_encoder registers but
  the model never runs (it reads backbone.language_backbone);
- `complex_query_proj.*` and `concept_proj.*`: with the released stage-3 config
  (share_mlp_params) these are the projection head `simple_query_proj` again; checked identical.
A stage-1 or stage-2 checkpoint has no projection head: it is initialised fresh, and reported so.
"""

from __future__ import annotations

import time

import numpy as np

from convert.checkpoint_io import TensorStore, read_checkpoint
from convert.sam3 import IGNORED_GROUPS, convert_store, sam3i_fresh, strip_detector_prefix
from convert.torch_layout import ConversionError, LoadReport
from sam3i_jax.models.config import Sam3Config, get_preset

_HEAD = "simple_query_proj."
_HEAD_COPIES = ("complex_query_proj.", "concept_proj.")

SAM3I_IGNORED = {
    **IGNORED_GROUPS,
    "dead duplicate text encoder (backbone.text.*)": lambda k: k.startswith("backbone.text."),
    "shared projection head under its other names (complex_query_proj, concept_proj; identical)":
        lambda k: k.startswith(_HEAD_COPIES),
}


def check_shared_head(store: TensorStore) -> int:
  """Checks that complex_query_proj.* and concept_proj.* equal simple_query_proj.*; returns how many
  copies there are. Separate heads (share_mlp_params: False) are not supported."""
  copies = [k for k in store if k.startswith(_HEAD_COPIES)]
  for key in copies:
    original = _HEAD + key.split(".", 1)[1]
    if original not in store:
      raise ConversionError(f"{key} has no counterpart {original}: only the shared projection head of "
                            "the released stage-3 config (share_mlp_params: True) is supported")
    if not np.array_equal(store[key], store[original]):
      raise ConversionError(f"{key} differs from {original}: the checkpoint has separate projection "
                            "heads (share_mlp_params: False), which this model does not support")
  return len(copies)


def convert_sam3i(checkpoint: str, output: str, *, base: Sam3Config | None = None,
                  vocab_path: str | None = None, log=print) -> LoadReport:
  """Converts a SAM3-I checkpoint into `output`; raises ConversionError on any tensor that does not
  fit, on a partly present group and on separate projection heads."""
  start = time.time()
  store = strip_detector_prefix(read_checkpoint(checkpoint))
  if not any(k.startswith("backbone.language_backbone.") and ".adapter1." in k for k in store):
    raise ConversionError(f"{checkpoint} has no SAM3-I adapters: convert a SAM 3 checkpoint with "
                          "`python -m convert sam3` (add --adapters for a SAM3-I model)")
  log(f"checked {check_shared_head(store)} copies of the shared projection head")
  config = (base or get_preset("full")).replace(adapters=True)
  return convert_store(store, checkpoint, output, config, ignore=SAM3I_IGNORED,
                       fresh=sam3i_fresh(["projection head"]), vocab_path=vocab_path, log=log, start=start)
