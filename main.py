"""Entry point: `python main.py --config=configs/hmpl.py[:arg]`."""

from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/hmpl.py", "training configuration")


def main(argv):
  del argv
  config = _CONFIG.value
  print(config)
  print("Training is not yet available in this version: the model, converter and predictor are "
        "(see README). The demo training run lands with the training issue.")


if __name__ == "__main__":
  app.run(main)
