"""A small, deterministic instruction-segmentation set in the HMPL-Instruct file layout.

Scenes of 256 x 256 px (JPEG) hold 2-4 objects of four classes, each with a part that
instructions can ask for: mug (handle), house (roof), car (wheels, two per car) and flag (pole),
in four bold colours at clear positions. Every datapoint has instructions at the three levels,
and the words decide the target:
  concept  the class or part noun: "mug", "car wheel";
  simple   attribute / position / relation: "the red mug", "the car on the left",
           "the flag to the right of the house", "the handle of the blue mug";
  complex  function / reasoning, with colours and positions as riddles: "something you could
           drink hot coffee from that is tomato-coloured", "what the sky-coloured vehicle rolls on".
Each image gives a 1to1 entry (one target), a 1toN entry when the scene has one (several targets,
not all of a class: "the red cars", "the wheels of the yellow car"), a 1toAll entry (every
instance of a class or part) and sometimes a negative (a class that is not in the scene, no
annotations). Only the 1toAll entries and negatives use the concept consistently with their
targets, as in HMPL-Instruct (a 1to1 entry's concept "mug" names all mugs, its target is one).
Categories are named in the style of PACO-LVIS (which HMPL-Instruct is built on): objects "mug",
parts "mug:handle", so the reader gives every datapoint its target kind (object or part) and
evaluation reports both; negatives query object classes.

The same scenes are also exported as COCO instances (`coco/instances_{split}.json`: every object
and part of each image annotated, categories as above), the demo of fine-tuning SAM 3 on a COCO
dataset.

Layout (under `default_demo_dir()` = `$SAM3I_DATA_DIR/demo_hmpl` or
`~/.cache/sam3i_jax/demo_hmpl`):
  images/{train,val}/NNNNNN.jpg
  HMPL-Instruct_{1to1,1toN,1toAll}/sam3i_{train,val}.json
  coco/instances_{train,val}.json
  demo_stamp.json   hash of this file + the parameters; a different stamp regenerates the set.
Segmentations are compressed RLE, except roofs (polygons) and flag poles (uncompressed RLE), so
every format of the reader is exercised by real files. Generation takes a few seconds and is
serialised between processes with a file lock.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image, ImageDraw

ENV_VAR = "SAM3I_DATA_DIR"
IMAGE_FOLDER = "images"
STAMP_FILE = "demo_stamp.json"
SUBSETS = ("HMPL-Instruct_1to1", "HMPL-Instruct_1toN", "HMPL-Instruct_1toAll")
COCO_FOLDER = "coco"  # the COCO export: <root>/coco/instances_<split>.json
SPLIT_SEEDS = {"train": 0, "val": 1}
IMAGE_SIZE = 256
BACKGROUND = (232, 232, 226)
COLOURS = {"red": (215, 35, 35), "green": (40, 160, 50), "blue": (35, 75, 215),
           "yellow": (235, 195, 25)}
COLOUR_RIDDLES = {"red": "tomato-coloured", "green": "grass-coloured", "blue": "sky-coloured",
                  "yellow": "banana-coloured"}
POSITION_RIDDLES = {"left": "on the side where reading starts",
                    "right": "on the side where reading ends",
                    "top": "that sits higher up", "bottom": "that sits lower down"}
POSITION_WORDS = {"left": "on the left", "right": "on the right", "top": "at the top",
                  "bottom": "at the bottom"}
MIN_GAP = 16  # px between instance centres for a position word to apply
NEGATIVE_RATE = 0.25


@dataclasses.dataclass(frozen=True)
class Kind:
  """An object class, its instructable part, and the phrases that name them."""

  name: str
  plural: str
  part: str
  parts: str  # plural
  category_id: int
  part_category_id: int
  nickname: str  # how complex instructions call one: "the cup"
  functions: tuple[str, str]  # complex phrases for one object
  functions_plural: tuple[str, str]
  part_function: str  # "{}" = the object as complex instructions call it
  part_function_all: str


KINDS = (
    Kind("mug", "mugs", "handle", "handles", 1, 2, "cup",
         ("something you could drink hot coffee from", "a cup for your morning tea"),
         ("things you could drink hot coffee from", "cups for your morning tea"),
         "what you would hold {} by", "every part you would hold a cup by"),
    Kind("house", "houses", "roof", "roofs", 3, 4, "home",
         ("a building where a family could live", "a home to sleep in at night"),
         ("buildings where a family could live", "homes to sleep in at night"),
         "what keeps the rain off {}", "everything that keeps the rain off a home"),
    Kind("car", "cars", "wheel", "wheels", 5, 6, "vehicle",
         ("a vehicle you could drive to work", "something that takes you on a road trip"),
         ("vehicles you could drive to work", "things that take you on a road trip"),
         "what {} rolls on", "everything the vehicles roll on"),
    Kind("flag", "flags", "pole", "poles", 7, 8, "banner",
         ("a banner that waves in the wind", "cloth raised to show which team you support"),
         ("banners that wave in the wind", "cloths raised to show which team you support"),
         "what holds {} up", "everything that holds a banner up"),
)


def default_demo_dir() -> pathlib.Path:
  base = os.environ.get(ENV_VAR)
  root = pathlib.Path(base) if base else pathlib.Path.home() / ".cache" / "sam3i_jax"
  return root / "demo_hmpl"


@dataclasses.dataclass
class SceneObject:
  kind: Kind
  colour: str
  box: tuple[int, int, int]  # x, y, size of its square cell
  mask: np.ndarray  # (H, W) bool, the whole object
  parts: list[np.ndarray]  # (H, W) bool per part instance (two wheels for a car)
  part_polygon: list[float] | None = None  # the roof's exact polygon

  @property
  def centre(self) -> tuple[float, float]:
    x, y, s = self.box
    return x + s / 2, y + s / 2


def _shape(*shapes: tuple[str, list[float]]) -> np.ndarray:
  """(H, W) bool mask of PIL shapes, e.g. ("rectangle", [x0, y0, x1, y1])."""
  image = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
  draw = ImageDraw.Draw(image)
  for method, xy in shapes:
    getattr(draw, method)(xy, fill=1)
  return np.asarray(image) > 0


def _render(kind: Kind, colour: str, x: int, y: int, s: int
            ) -> tuple[list[tuple[np.ndarray, tuple[int, ...]]], list[np.ndarray],
                       list[float] | None]:
  """(painted layers (mask, rgb) bottom to top, part masks, part polygon) of one object."""
  rgb = COLOURS[colour]

  def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x + x0 * s, y + y0 * s, x + x1 * s, y + y1 * s]

  if kind.name == "mug":
    body = _shape(("rectangle", box(.12, .22, .62, .92)))
    ring = (_shape(("ellipse", box(.46, .34, .92, .80)))
            & ~_shape(("ellipse", box(.58, .47, .80, .67))) & ~body)
    return [(body, rgb), (ring, rgb)], [ring], None
  if kind.name == "house":
    roof_polygon = [x + .06 * s, y + .52 * s, x + .94 * s, y + .52 * s, x + .5 * s, y + .08 * s]
    roof = _shape(("polygon", roof_polygon))
    walls = _shape(("rectangle", box(.16, .5, .84, .94))) & ~roof
    return [(walls, rgb), (roof, tuple(int(c * 0.6) for c in rgb))], [roof], roof_polygon
  if kind.name == "car":
    body = _shape(("rectangle", box(.04, .42, .96, .72)), ("rectangle", box(.22, .18, .74, .44)))
    wheels = [_shape(("ellipse", box(cx - .15, .6, cx + .15, .9))) for cx in (.26, .74)]
    return [(body, rgb)] + [(w, (35, 35, 35)) for w in wheels], wheels, None
  cloth = _shape(("rectangle", box(.24, .08, .9, .5)))
  pole = _shape(("rectangle", box(.12, .04, .24, .96))) & ~cloth
  return [(pole, (110, 110, 110)), (cloth, rgb)], [pole], None


def _scene(rng: np.random.Generator) -> tuple[np.ndarray, list[SceneObject]]:
  """An RGB image and its objects: one class repeated 1-3 times plus other classes, no overlap."""
  main = KINDS[rng.integers(len(KINDS))]
  others = [k for k in KINDS if k is not main]
  count = int(rng.integers(2, 5))
  repeats = min(count, int(rng.choice([1, 2, 3], p=[0.2, 0.4, 0.4])))
  kinds = [main] * repeats + [others[i] for i in rng.permutation(len(others))[:count - repeats]]
  colour_names = list(COLOURS)
  main_colours = [colour_names[rng.integers(4)] for _ in range(repeats)]
  if repeats == 3 and rng.random() < 0.6:  # two of a colour, one other: a "the red cars" subset
    main_colours[1] = main_colours[0]
  placed: list[tuple[int, int, int]] = []
  objects = []
  pixels = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  pixels[:] = BACKGROUND
  for n, kind in enumerate(kinds):
    colour = main_colours[n] if n < repeats else colour_names[rng.integers(4)]
    for _ in range(200):
      s = int(rng.integers(64, 90))
      x, y = (int(v) for v in rng.integers(4, IMAGE_SIZE - s - 4, size=2))
      if all(x + s + 6 <= px or px + ps + 6 <= x or y + s + 6 <= py or py + ps + 6 <= y
             for px, py, ps in placed):
        break
    else:
      continue  # no room left: a scene with fewer objects
    placed.append((x, y, s))
    layers, parts, polygon = _render(kind, colour, x, y, s)
    for mask, rgb in layers:
      pixels[mask] = rgb
    whole = np.logical_or.reduce([m for m, _ in layers])
    objects.append(SceneObject(kind, colour, (x, y, s), whole, parts, polygon))
  return pixels, objects


def _position(target: SceneObject, same: list[SceneObject]) -> str | None:
  """A position word that singles `target` out among `same` (its class), if any."""
  if len(same) < 2:
    return None
  cx, cy = target.centre
  others = [o.centre for o in same if o is not target]
  if all(cx + MIN_GAP < ox for ox, _ in others):
    return "left"
  if all(cx - MIN_GAP > ox for ox, _ in others):
    return "right"
  if all(cy + MIN_GAP < oy for _, oy in others):
    return "top"
  if all(cy - MIN_GAP > oy for _, oy in others):
    return "bottom"
  return None


@dataclasses.dataclass
class Entry:
  """One datapoint: the targets ((object index, part index or None) pairs) and instructions.

  A negative (no targets) gets its subset from the caller, which spreads them evenly.
  """

  subset: str
  targets: list[tuple[int, int | None]]
  category_id: int
  concept: list[str]
  simple: list[str]
  complex: list[str]


def _object_phrases(obj: SceneObject, objects: list[SceneObject]
                    ) -> list[tuple[list[str], list[str]]]:
  """(simple, complex) phrasings that single out `obj`; empty if none does."""
  kind = obj.kind
  same = [o for o in objects if o.kind is kind]
  phrases = []
  if sum(o.colour == obj.colour for o in same) == 1:
    riddle = COLOUR_RIDDLES[obj.colour]
    phrases.append(([f"the {obj.colour} {kind.name}", f"find the {obj.colour} {kind.name}"],
                    [f"{f} that is {riddle}" for f in kind.functions]))
  position = _position(obj, same)
  if position:
    phrases.append(([f"the {kind.name} {POSITION_WORDS[position]}",
                     f"segment the {kind.name} {POSITION_WORDS[position]}"],
                    [f"{f} {POSITION_RIDDLES[position]}" for f in kind.functions]))
  if len(same) == 1:
    for other in objects:
      if other is obj or sum(o.kind is other.kind for o in objects) != 1:
        continue
      if abs(obj.centre[0] - other.centre[0]) > MIN_GAP:
        side = "left" if obj.centre[0] < other.centre[0] else "right"
        phrases.append(([f"the {kind.name} to the {side} of the {other.kind.name}"],
                        [f"{f} standing {side} of the {other.kind.nickname}"
                         for f in kind.functions]))
        break
  return phrases


def _referring_name(obj: SceneObject, objects: list[SceneObject]) -> tuple[str, str] | None:
  """(simple, complex) noun phrase for `obj` when it is the only one of its class or colour."""
  same = [o for o in objects if o.kind is obj.kind]
  if len(same) == 1:
    return f"the {obj.kind.name}", f"the {obj.kind.nickname}"
  if sum(o.colour == obj.colour for o in same) == 1:
    return (f"the {obj.colour} {obj.kind.name}",
            f"the {COLOUR_RIDDLES[obj.colour]} {obj.kind.nickname}")
  return None


def _entries(objects: list[SceneObject], rng: np.random.Generator) -> list[Entry]:
  """The scene's datapoints: one 1to1, one 1toN if possible, one 1toAll, maybe a negative."""
  one, many, every = [], [], []
  for i, obj in enumerate(objects):
    kind = obj.kind
    for simple, complex_ in _object_phrases(obj, objects):
      one.append(Entry(SUBSETS[0], [(i, None)], kind.category_id, [kind.name], simple, complex_))
    name = _referring_name(obj, objects)
    alone = sum(o.kind is kind for o in objects) == 1
    if name is None or (len(obj.parts) > 1 and alone):
      continue  # the wheels of the only car are all the wheels: a 1toAll entry covers them
    simple_name, complex_name = name
    part_targets = [(i, p) for p in range(len(obj.parts))]
    entry = Entry(SUBSETS[0] if len(obj.parts) == 1 else SUBSETS[1], part_targets,
                  kind.part_category_id, [f"{kind.name} {kind.part}"],
                  [f"the {kind.part if len(obj.parts) == 1 else kind.parts} of {simple_name}"],
                  [kind.part_function.format(complex_name)])
    (one if len(obj.parts) == 1 else many).append(entry)
  for kind in KINDS:
    members = [i for i, o in enumerate(objects) if o.kind is kind]
    if not members:
      continue
    every.append(Entry(SUBSETS[2], [(i, None) for i in members], kind.category_id, [kind.name],
                       [f"all the {kind.plural}", f"every {kind.name}"],
                       [f"all the {f}" for f in kind.functions_plural]))
    every.append(Entry(SUBSETS[2], [(i, p) for i in members for p in range(len(objects[i].parts))],
                       kind.part_category_id, [f"{kind.name} {kind.part}"],
                       [f"all the {kind.parts}", f"every {kind.part}"], [kind.part_function_all]))
    for colour in COLOURS:
      group = [i for i in members if objects[i].colour == colour]
      if 2 <= len(group) < len(members):
        many.append(Entry(SUBSETS[1], [(i, None) for i in group], kind.category_id, [kind.name],
                          [f"the {colour} {kind.plural}", f"all {colour} {kind.plural}"],
                          [f"the {f} that are {COLOUR_RIDDLES[colour]}"
                           for f in kind.functions_plural]))
  chosen = [options[rng.integers(len(options))] for options in (one, many, every) if options]
  absent = [k for k in KINDS if all(o.kind is not k for o in objects)]
  if absent and rng.random() < NEGATIVE_RATE:
    kind = absent[rng.integers(len(absent))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    chosen.append(Entry("", [], kind.category_id, [kind.name],  # subset: set by the caller
                        [f"the {colour} {kind.name}", f"all the {kind.plural}"],
                        [f"{kind.functions[0]} that is {COLOUR_RIDDLES[colour]}",
                         f"all the {kind.functions_plural[1]}"]))
  return chosen


def _categories() -> list[dict[str, Any]]:
  cats = []
  for kind in KINDS:
    cats.append({"id": kind.category_id, "name": kind.name})
    cats.append({"id": kind.part_category_id, "name": f"{kind.name}:{kind.part}"})
  return cats


def _annotation(obj: SceneObject, part: int | None, ann_id: int, image_id: int) -> dict[str, Any]:
  mask = obj.mask if part is None else obj.parts[part]
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  segmentation: Any = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
  category = obj.kind.category_id if part is None else obj.kind.part_category_id
  if part is not None and obj.part_polygon is not None:  # the roof: its exact polygon
    segmentation = [[round(v, 2) for v in obj.part_polygon]]
    rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, IMAGE_SIZE, IMAGE_SIZE))
  elif part is not None and obj.kind.name == "flag":  # the pole: uncompressed RLE
    flat = mask.reshape(-1, order="F")
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    segmentation = {"size": [IMAGE_SIZE, IMAGE_SIZE], "counts": [0] + counts if flat[0] else counts}
  return {"id": ann_id, "image_id": image_id, "category_id": category,
          "bbox": [round(float(v), 2) for v in mask_utils.toBbox(rle)],
          "area": int(mask_utils.area(rle)), "segmentation": segmentation, "iscrowd": 0}


def _generate_split(root: pathlib.Path, split: str, num_images: int, seed: int,
                    first_id: int) -> int:
  """Writes the split's images and JSON files; returns the next free datapoint id."""
  rng = np.random.default_rng([seed, SPLIT_SEEDS[split]])
  image_dir = root / IMAGE_FOLDER / split
  image_dir.mkdir(parents=True)
  files = {s: {"images": [], "annotations": [], "categories": _categories()} for s in SUBSETS}
  instances = {"images": [], "annotations": [], "categories": _categories()}
  next_id, next_ann, negatives = first_id, 1, 0
  for n in range(num_images):
    pixels, objects = _scene(rng)
    file_name = f"{split}/{n:06d}.jpg"
    Image.fromarray(pixels).save(root / IMAGE_FOLDER / file_name, quality=92)
    instances["images"].append({"id": n + 1, "file_name": file_name, "width": IMAGE_SIZE,
                                "height": IMAGE_SIZE})
    for obj in objects:
      for part in (None, *range(len(obj.parts))):
        instances["annotations"].append(
            _annotation(obj, part, len(instances["annotations"]) + 1, n + 1))
    for entry in _entries(objects, rng):
      if not entry.targets:  # negatives go to the subsets in turn
        entry.subset = SUBSETS[negatives % len(SUBSETS)]
        negatives += 1
      data = files[entry.subset]
      data["images"].append({
          "id": next_id, "file_name": file_name, "width": IMAGE_SIZE, "height": IMAGE_SIZE,
          "text_inst_input": {"concept": entry.concept, "simple_query": entry.simple,
                              "complex_query": entry.complex},
          "queried_category": entry.category_id})
      for obj_index, part in entry.targets:
        data["annotations"].append(_annotation(objects[obj_index], part, next_ann, next_id))
        next_ann += 1
      next_id += 1
  for subset, data in files.items():
    (root / subset).mkdir(exist_ok=True)
    with open(root / subset / f"sam3i_{split}.json", "w") as f:
      json.dump(data, f)
  (root / COCO_FOLDER).mkdir(exist_ok=True)
  with open(root / COCO_FOLDER / f"instances_{split}.json", "w") as f:
    json.dump(instances, f)
  return next_id


def _stamp(num_train_images: int, num_val_images: int, seed: int) -> dict[str, Any]:
  with open(__file__, "rb") as f:
    generator = hashlib.sha256(f.read()).hexdigest()
  return {"generator_sha256": generator, "num_train_images": num_train_images,
          "num_val_images": num_val_images, "seed": seed}


def _read_stamp(root: pathlib.Path) -> dict[str, Any] | None:
  try:
    with open(root / STAMP_FILE) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def ensure_demo_data(root: str | os.PathLike | None = None, *, num_train_images: int = 320,
                     num_val_images: int = 64, seed: int = 0) -> pathlib.Path:
  """The demo set's folder, generated first if it is missing or its stamp differs.

  Only a folder that holds a demo stamp (an older demo set) or nothing is replaced.
  """
  root = pathlib.Path(root) if root is not None else default_demo_dir()
  stamp = _stamp(num_train_images, num_val_images, seed)
  if _read_stamp(root) == stamp:
    return root
  if root.exists() and any(root.iterdir()) and not (root / STAMP_FILE).exists():
    raise FileExistsError(f"{root} holds other data (no {STAMP_FILE}); not overwriting it")
  root.parent.mkdir(parents=True, exist_ok=True)
  with open(root.parent / f".{root.name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # one generator at a time; the others reuse its result
    if _read_stamp(root) == stamp:
      return root
    work = pathlib.Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    next_id = 1
    for split, num_images in (("train", num_train_images), ("val", num_val_images)):
      next_id = _generate_split(work, split, num_images, seed, next_id)
    with open(work / STAMP_FILE, "w") as f:
      json.dump(stamp, f, indent=1)
    if root.exists():
      shutil.rmtree(root)
    work.rename(root)
  return root


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=None, help=f"folder (default {default_demo_dir()})")
  args = parser.parse_args(argv)
  root = ensure_demo_data(args.out)
  for subset in SUBSETS:
    for split in SPLIT_SEEDS:
      with open(root / subset / f"sam3i_{split}.json") as f:
        data = json.load(f)
      targets = {a["image_id"] for a in data["annotations"]}
      negatives = sum(i["id"] not in targets for i in data["images"])
      print(f"{subset}/{split}: {len(data['images'])} datapoints, {len(data['annotations'])} "
            f"masks, {negatives} negatives")
  print(root)


if __name__ == "__main__":
  main()
