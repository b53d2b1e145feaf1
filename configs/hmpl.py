"""The main training config: `python main.py --config=configs/hmpl.py[:arg]`.

`arg` is a comma-separated list: a variant (`demo`, `smoke`) and/or key=value settings
(e.g. `stage=2`). The training fields land with the training issue; the model part is final.
"""

import ml_collections

VARIANTS = {
    "": dict(model="full"),
    "demo": dict(model="tiny"),
    "smoke": dict(model="tiny"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, settings = "", {}
  for part in filter(None, (arg or "").split(",")):
    key, eq, value = part.partition("=")
    if eq:
      settings[key] = value
    elif part in VARIANTS:
      variant = part
    else:
      raise ValueError(f"unknown config argument {part!r}; variants: {sorted(v for v in VARIANTS if v)}")
  config = ml_collections.ConfigDict()
  config.variant = variant or "default"
  config.model = ml_collections.ConfigDict({"preset": VARIANTS[variant]["model"], "dtype": "float32"})
  config.stage = int(settings.pop("stage", 1))
  if settings:
    raise ValueError(f"unknown config settings: {sorted(settings)}")
  config.lock()
  return config
