"""Input pipeline: HMPL-Instruct reader, TFDS builder (ArrayRecord), grain pipelines, demo set.

    config = input_pipeline.default_config("demo")     # or "released", "hmpl"
    train = input_pipeline.train_pipeline(config, model_config)
    batches = train.iterator()                        # grain DatasetIterator: get/set_state
    batch = input_pipeline.make_global_batch(next(batches), mesh, ("data", "fsdp"))

Batches follow the batch contract (`transforms.BATCH_KEYS`). Importing this package never imports
tensorflow or tensorflow_datasets: only TFDS sources and the builder do.
"""

from input_pipeline.config import RELEASED_MIXTURE, dataset_entry, default_config
from input_pipeline.hmpl import BadInputError, InputReport, Record, read_hmpl_json
from input_pipeline.pipeline import Pipeline, eval_pipeline, train_pipeline
from input_pipeline.sharding import host_local_batch, make_global_batch, split_host_fields
from input_pipeline.transforms import (BATCH_KEYS, HOST_KEY, ExampleSpec, concept_id,
                                       train_sizes)

__all__ = [
    "BATCH_KEYS", "HOST_KEY", "RELEASED_MIXTURE", "BadInputError", "ExampleSpec", "InputReport",
    "Pipeline", "Record", "concept_id", "dataset_entry", "default_config", "eval_pipeline",
    "host_local_batch", "make_global_batch", "read_hmpl_json", "split_host_fields",
    "train_pipeline", "train_sizes",
]
