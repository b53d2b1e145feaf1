"""Converted directories of an earlier parameter layout -> the current one.

sam3i-jax 0.1 kept one parameter per layer (`...resblocks.3.attn.in_proj.kernel`); from 0.2 the
repeated layers are stacked and scanned (sam3i_jax/models/stacking.py). `load_pretrained` still
reads the old layout (restacking in memory on every load); this rewrites a directory once.
"""

from __future__ import annotations

import json
import os
import shutil

from sam3i_jax.pretrained import (CONFIG_FILE, PARAMS_DIR, REPORT_FILE, VOCAB_FILE, load_pretrained,
                                  read_config, save_pretrained)


def migrate_directory(source: str, output: str) -> None:
  """Writes `source` (a converted directory of any supported layout) to `output` in the current
  layout: the same config, vocabulary and conversion report, plus a note of the migration."""
  config = read_config(source)
  model = load_pretrained(source)
  report_path = os.path.join(source, REPORT_FILE)
  report = json.load(open(report_path)) if os.path.isfile(report_path) else {}
  report["migrated_from"] = source
  vocab = os.path.join(source, VOCAB_FILE)
  save_pretrained(model, config, output, vocab_path=vocab if os.path.isfile(vocab) else None,
                  report=report)
  for name in sorted(os.listdir(source)):  # anything else the directory holds (e.g. a README)
    if name not in (CONFIG_FILE, REPORT_FILE, VOCAB_FILE, PARAMS_DIR):
      copy = shutil.copytree if os.path.isdir(os.path.join(source, name)) else shutil.copyfile
      copy(os.path.join(source, name), os.path.join(output, name))
  print(f"migrated {source} -> {output}")
