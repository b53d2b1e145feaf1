"""configs/benchmarks.py through the loop in eval mode: the demo's tiny SAM3-I model evaluated on
small InstructPart and ReasonSeg folders in their published layouts under `data.data_root`."""

import json
import shutil

import pytest

from configs import benchmarks, hmpl
from sam3i_jax.train import loop
from test_input_benchmarks import instructpart_split, reasonseg_split  # noqa: F401  (fixtures)


def evaluate(arg, data_root, workdir, jax_cache, bad_input="skip"):
  config = benchmarks.get_config(arg)
  config.unlock()
  config.mode = "eval"
  config.init.checkpoint = hmpl.DEMO_SAM3_DIR
  config.model.update(dtype="float32", remat="none", layer_remat="none")
  config.data.update(data_root=str(data_root), bad_input=bad_input, eval_batch_size=4)
  config.workdir = str(workdir)
  config.compilation_cache_dir = str(jax_cache)
  config.eval.num_images = 0
  config.lock()
  results = loop.run(config)["eval"]
  with open(workdir / "metrics.json") as f:  # eval mode writes it too, where docs/training.md says
    assert json.load(f)["eval"] == results
  return results


def test_instructpart_reports_orps_and_trps_levels(instructpart_split, tmp_path, jax_cache):  # noqa: F811
  shutil.copytree(instructpart_split, tmp_path / "data" / "InstructPart" / "test")
  results = evaluate("instructpart", tmp_path / "data", tmp_path / "run", jax_cache)
  for level in ("concept", "complex"):  # ORPS, TRPS: the 2 good part entries each
    group = results[f"level={level}/dataset=InstructPart"]
    assert group["count"] == 2 and {"gIoU", "gIoU_lisa", "cIoU", "P@0.5"} <= group.keys()
  assert "level=simple/dataset=InstructPart" not in results
  assert results["level=complex/kind=part"]["count"] == 2


def test_reasonseg_reports_short_and_long_queries(reasonseg_split, tmp_path, jax_cache):  # noqa: F811
  shutil.copytree(reasonseg_split, tmp_path / "data" / "ReasonSeg" / "val")
  results = evaluate("reasonseg", tmp_path / "data", tmp_path / "run", jax_cache)
  assert results["level=complex/dataset=ReasonSeg"]["count"] == 3
  assert results["level=complex/kind=long"]["count"] == 2
  assert results["level=complex/kind=short"]["count"] == 1
  assert not any(group.startswith(("level=concept", "level=simple")) for group in results)


def test_an_unknown_benchmark_is_named():
  with pytest.raises(ValueError, match="one of .*'reasonseg'\\), got 'refcoco_plus'"):
    benchmarks.get_config("refcoco_plus")


def test_the_hmpl_family_reads_sam3i_json_with_their_protocols(tmp_path):
  """hmpl, refcoco, refzom: SAM3-I's JSON layout under data_root, the COCO image roots, and the
  combine rule of SAM3-I's eval.sh (RefCOCO: the top-1 mask)."""
  import input_pipeline
  for arg, names, combine in (("hmpl", input_pipeline.config.HMPL_SUBSETS, "union"),
                              ("refcoco", ("RefCOCO",), "top1"), ("refzom", ("Ref-ZOM",), "union")):
    config = benchmarks.get_config(arg)
    assert tuple(e.name for e in config.data.datasets) == tuple(names)
    assert {e.format for e in config.data.datasets} == {"hmpl"} and config.eval.combine == combine
    entry = config.data.datasets[0]
    config.unlock()
    config.data.data_root = str(tmp_path)
    config.data.image_roots[entry.images] = str(tmp_path / "images")
    with pytest.raises(input_pipeline.BadInputError, match=f"{entry.name}/sam3i_val.json: "
                       "annotation file not found"):
      input_pipeline.pipeline.open_source(config.data, entry, "val", 32)


@pytest.mark.parametrize("arg, groups", [
    ("instructpart", {"level=concept/dataset=InstructPart": 2, "level=complex/dataset=InstructPart": 2}),
    ("reasonseg", {"level=complex/dataset=ReasonSeg": 1, "level=complex/kind=long": 1}),
])
def test_the_readme_command_on_the_example_folders(arg, groups, tmp_path, jax_cache):
  """docs/examples/ holds one example of each published layout, as docs/evaluation.md's "The
  paper's benchmarks" describes; its command evaluates them with no bad input."""
  import os
  root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                      "examples")
  results = evaluate(arg, root, tmp_path / "run", jax_cache, bad_input="error")
  for group, count in groups.items():
    assert results[group]["count"] == count, group


def test_fine_tuning_on_a_published_layout_trains_and_evaluates(tmp_path, jax_cache):
  """Without mode=eval: ReasonSeg's stage 2 (complex instructions) for 2 steps on the example
  folder (its val split standing in for train), then the evaluation."""
  import os
  root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                      "examples")
  config = benchmarks.get_config("reasonseg")
  config.unlock()
  config.init.checkpoint = hmpl.DEMO_SAM3_DIR
  config.model.update(dtype="float32", remat="none", layer_remat="none")
  config.data.update(data_root=root, train_split="val", max_targets=8, eval_batch_size=2)
  config.stage_settings.stage2.update(steps=2, epochs=None)
  config.train.update(global_batch=2, loss_replicas=1, loss_pad_queries=0, log_every=1,
                      checkpoint_every=2)
  config.data.batch_size = 2
  config.workdir = str(tmp_path / "run")
  config.compilation_cache_dir = str(jax_cache)
  config.eval.num_images = 0
  config.lock()
  results = loop.run(config)
  assert results["stage2"]["level=complex/dataset=ReasonSeg"]["count"] == 1
  assert (tmp_path / "run" / "stage2" / loop.FINAL_DIR).is_dir()
