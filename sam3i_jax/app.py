"""The web demo: a page to try a model by hand.

  pip install -e '.[app]'
  python -m sam3i_jax.app [--model DIR] [--host 127.0.0.1] [--port 7860]

Pick an example or upload an image, type a prompt, choose its instruction level (concept / simple /
complex; the instruction levels need a SAM3-I model) and the score threshold; click two opposite
corners on the image to add an exemplar box (positive or negative). The page draws the kept
masks and boxes with their scores, lists the detections, offers them as a COCO results JSON (the
format of `python -m sam3i_jax.predict --images`) and as PNG masks, and runs the three levels side
by side. Every image is resized to the model's square input, as the Predictor does, so one image
program serves every image size, and the prompt side compiles once per level and exemplar-box
bucket: the page says how long each answer took and whether it compiled. Bad input (a file that
is not an image, an empty prompt, an image over MAX_MEGAPIXELS) gets its message on the page.

Without --model the page serves the demo's tiny model (assets/demo_sam3_tiny: SAM 3 with the
SAM3-I adapters at identity, so its three levels answer alike); after `make demo`,
`--model runs/demo/stage3/final` serves the SAM3-I model it trained. Gradio is imported here only,
never by `import sam3i_jax`; the page loads nothing from outside its server (system fonts, no
analytics).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import html
import io
import json
import os
import pathlib
import sys
import tempfile
import threading
import time
import traceback
import zipfile

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when Gradio is imported

import numpy as np
from PIL import Image, ImageDraw

try:
  import gradio as gr
except ImportError as e:
  raise ImportError("the web demo needs Gradio: pip install -e '.[app]'") from e

from sam3i_jax.models.levels import Level
from sam3i_jax.predict import Prediction, Predictor, coco_results

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "assets"
DEFAULT_MODEL = ASSETS / "demo_sam3_tiny"
EXAMPLES = ASSETS / "app_examples"  # demo-set images and a prompt at each level (examples.json)
MAX_MEGAPIXELS = 40  # larger uploads are refused before they are decoded
MIN_BOX_PIXELS = 2  # an exemplar box narrower or lower than this is a slip of the mouse
LEVELS = [level.value for level in Level]


class InputError(ValueError):
  """Input the page refuses, with the message it shows."""


@dataclasses.dataclass(frozen=True)
class Exemplar:
  box_xyxy: tuple[float, float, float, float]  # pixels of the image
  positive: bool


@dataclasses.dataclass
class Answer:
  prediction: Prediction
  level: str
  text: str
  seconds: float
  compiled: int  # programs compiled while answering
  compile_seconds: float

  def timing(self) -> str:
    if not self.compiled:
      return f"answered in {self.seconds:.2f} s (no compilation)"
    return (f"answered in {self.seconds:.2f} s, {self.compile_seconds:.2f} s of it compiling "
            f"{self.compiled} program(s) (the first query of its level and box count; the next "
            "ones reuse them)")


def read_image(path: str, name: str | None = None) -> np.ndarray:
  """uint8 (H, W, 3) pixels of an uploaded file, or InputError naming the file and the fault."""
  name = name or os.path.basename(path)
  try:
    with Image.open(path) as image:
      width, height = image.size
      if width * height > MAX_MEGAPIXELS * 1e6:
        raise InputError(f"{name} is {width} x {height} pixels ({width * height / 1e6:.1f} MP); "
                         f"the demo takes images up to {MAX_MEGAPIXELS} MP: scale it down first")
      return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
  except InputError:
    raise
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise InputError(f"{name} is not an image that can be read ({type(e).__name__}: {e})") from e


def normalised_boxes(exemplars: list[Exemplar], image_size: tuple[int, int]
                     ) -> tuple[np.ndarray | None, np.ndarray | None]:
  """Exemplars as the Predictor's (N, 4) normalised cx, cy, w, h and (N,) labels."""
  if not exemplars:
    return None, None
  height, width = image_size
  xyxy = np.asarray([e.box_xyxy for e in exemplars], np.float32) / np.float32(
      [width, height, width, height])
  boxes = np.concatenate([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], -1)
  return boxes, np.asarray([e.positive for e in exemplars], bool)


class _CompileCounter:
  """Counts XLA compilations (jax's backend-compile events) while answering."""

  def __init__(self):
    import jax.monitoring
    from jax._src.dispatch import BACKEND_COMPILE_EVENT
    self.count, self.seconds, self._event = 0, 0.0, BACKEND_COMPILE_EVENT
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event: str, duration: float, **_) -> None:
    if event == self._event:
      self.count += 1
      self.seconds += duration


class Demo:
  """What the page does, without the page: answers, drawings, tables and downloads."""

  def __init__(self, predictor: Predictor, model_dir: str):
    self.predictor = predictor
    self.model_dir = model_dir
    self.levels = LEVELS if predictor.config.adapters else [Level.CONCEPT.value]
    self._lock = threading.Lock()  # one model: answers run one at a time, compiles counted apart
    self._compiles = _CompileCounter()
    self._downloads = tempfile.mkdtemp(prefix="sam3i_app_")

  @classmethod
  def from_pretrained(cls, model_dir: str) -> "Demo":
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
      raise FileNotFoundError(f"{model_dir} is not a converted model directory (no config.json): "
                              "pass --model with a directory written by `python -m convert` or "
                              "by training")
    return cls(Predictor.from_pretrained(model_dir), model_dir)

  def describe(self) -> str:
    config = self.predictor.config
    kind = "SAM3-I (concept, simple and complex)" if config.adapters else "SAM 3 (concept only)"
    relative = os.path.relpath(self.model_dir)
    shown = self.model_dir if relative.startswith("..") else relative
    return f"`{shown}`: {kind}, input {config.img_size} px"

  def answer(self, image: np.ndarray | None, text: str, level: str, threshold: float,
             exemplars: list[Exemplar]) -> Answer:
    if image is None:
      raise InputError("no image: pick an example or upload one")
    text = (text or "").strip()
    if not text:
      raise InputError(f"the {level} prompt is empty: type what to segment")
    if level not in self.levels:
      raise InputError(f"the {level} level needs a SAM3-I model (one with the instruction "
                       f"adapters); {self.model_dir} holds SAM 3, which answers concept prompts "
                       "only")
    if not 0.0 <= threshold <= 1.0:
      raise InputError(f"threshold {threshold} is not in [0, 1]")
    boxes, labels = normalised_boxes(exemplars, image.shape[:2])
    with self._lock:
      count, seconds, start = self._compiles.count, self._compiles.seconds, time.perf_counter()
      prediction = self.predictor.predict(image, text, boxes, labels, threshold=threshold,
                                          level=level)
      return Answer(prediction, level, text, time.perf_counter() - start,
                    self._compiles.count - count, self._compiles.seconds - seconds)

  def downloads(self, answer: Answer, image_name: str) -> list[str]:
    """The answer as a COCO results JSON and a zip of PNG masks (one per detection)."""
    folder = tempfile.mkdtemp(dir=self._downloads)
    stem = pathlib.Path(image_name).stem
    results = os.path.join(folder, f"{stem}.{answer.level}.results.json")
    with open(results, "w") as f:
      json.dump(coco_results(answer.prediction, 1, image_name, 1, answer.text), f)
    masks = os.path.join(folder, f"{stem}.{answer.level}.masks.zip")
    with zipfile.ZipFile(masks, "w") as archive:
      for k, (mask, score) in enumerate(zip(answer.prediction.masks, answer.prediction.scores)):
        png = io.BytesIO()
        Image.fromarray(mask.astype(np.uint8) * 255).save(png, format="PNG")
        archive.writestr(f"{stem}.mask{k}.score{score:.3f}.png", png.getvalue())
    return [results, masks]


def detections_table(prediction: Prediction) -> str:
  """The detections as an HTML table: score, box corners in pixels, mask area."""
  if not len(prediction.scores):
    return "<p>no detection above the threshold</p>"
  rows = "".join(
      f"<tr><td>{k}</td><td>{score:.3f}</td>"
      + "".join(f"<td>{v:.1f}</td>" for v in box)
      + f"<td>{int(mask.sum())}</td></tr>"
      for k, (score, box, mask) in enumerate(zip(prediction.scores, prediction.boxes_xyxy,
                                                 prediction.masks)))
  head = "".join(f"<th>{h}</th>" for h in ("#", "score", "x0", "y0", "x1", "y1", "mask px"))
  return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def draw_exemplars(image: np.ndarray, exemplars: list[Exemplar],
                   corner: tuple[float, float] | None) -> np.ndarray:
  """The image with its exemplar boxes (green positive, red negative) and a pending corner."""
  picture = Image.fromarray(image)
  pen = ImageDraw.Draw(picture)
  for exemplar in exemplars:
    pen.rectangle(exemplar.box_xyxy, outline=(0, 200, 0) if exemplar.positive else (220, 0, 0),
                  width=2)
  if corner is not None:
    x, y = corner
    pen.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(255, 200, 0))
  return np.asarray(picture)


def _exemplar_list(exemplars: list[Exemplar]) -> str:
  if not exemplars:
    return "no exemplar boxes (click two opposite corners on the image to add one)"
  return "exemplar boxes (x0, y0, x1, y1 px): " + "; ".join(
      f"{k + 1}. {'positive' if e.positive else 'negative'} "
      f"[{', '.join(f'{v:.0f}' for v in e.box_xyxy)}]" for k, e in enumerate(exemplars))


def _error(message: str) -> str:
  return f"**Error:** {html.escape(message)}"


def examples() -> list[dict]:
  with open(EXAMPLES / "examples.json") as f:
    return json.load(f)


def build_page(demo: Demo):
  """The Gradio page over `demo`."""
  shown = examples()
  empty = {"image": None, "name": None, "exemplars": [], "corner": None}

  def guarded(handler, outputs: int):
    """Runs a handler; bad input and failures become the status line, the rest unchanged."""
    @functools.wraps(handler)  # Gradio reads the signature: gr.SelectData arguments
    def run(*args):
      try:
        return handler(*args)
      except InputError as e:
        message = str(e)
      except Exception as e:  # the server keeps serving; the trace goes to its log
        traceback.print_exc()
        message = f"internal error: {type(e).__name__}: {e}"
      return (*[gr.update()] * (outputs - 1), _error(message))
    return run

  def load(image: np.ndarray, name: str, prompts: dict | None):
    state = {**empty, "image": image, "name": name}
    prompts = prompts or {}
    return (state, image, _exemplar_list([]), *[prompts.get(level, gr.update()) for level in LEVELS],
            prompts.get(Level.CONCEPT.value, gr.update()),
            f"{name}: {image.shape[1]} x {image.shape[0]} px")

  def upload(path: str | None):
    if not path:
      raise InputError("nothing was uploaded")
    return load(read_image(path), os.path.basename(path), None)

  def pick_example(event: gr.SelectData):
    example = shown[event.index]
    return load(read_image(str(EXAMPLES / example["image"])), example["image"], example)

  def click(state: dict, kind: str, event: gr.SelectData):
    if state["image"] is None:
      raise InputError("no image to draw on: pick an example or upload one")
    x, y = (float(v) for v in event.index)
    exemplars = list(state["exemplars"])
    if state["corner"] is None:
      state = {**state, "corner": (x, y)}
      message = f"first corner at ({x:.0f}, {y:.0f}): click the opposite corner"
    else:
      (x0, y0), state = state["corner"], {**state, "corner": None}
      box = (min(x0, x), min(y0, y), max(x0, x), max(y0, y))
      if box[2] - box[0] < MIN_BOX_PIXELS or box[3] - box[1] < MIN_BOX_PIXELS:
        raise InputError(f"box [{', '.join(f'{v:.0f}' for v in box)}] is under "
                         f"{MIN_BOX_PIXELS} px wide or high: click the opposite corner of "
                         f"({x0:.0f}, {y0:.0f}) farther from it")
      exemplars.append(Exemplar(box, kind == "positive"))
      state = {**state, "exemplars": exemplars}
      message = f"added a {kind} exemplar box"
    return (state, draw_exemplars(state["image"], exemplars, state["corner"]),
            _exemplar_list(exemplars), message)

  def clear_boxes(state: dict):
    state = {**state, "exemplars": [], "corner": None}
    return state, state["image"], _exemplar_list([]), "exemplar boxes cleared"

  def segment(state: dict, text: str, level: str, threshold: float):
    answer = demo.answer(state["image"], text, level, threshold, state["exemplars"])
    found, boxes = len(answer.prediction.scores), len(state["exemplars"])
    return (np.asarray(answer.prediction.draw(state["image"])),
            detections_table(answer.prediction), demo.downloads(answer, state["name"]),
            f"{level} prompt {text.strip()!r} with {boxes} exemplar box(es): {found} "
            f"detection(s) above {threshold:g}; {answer.timing()}")

  def compare(state: dict, threshold: float, *texts: str):
    answers = [demo.answer(state["image"], text, level, threshold, state["exemplars"])
               for level, text in zip(LEVELS, texts)]
    pictures = [np.asarray(a.prediction.draw(state["image"])) for a in answers]
    summary = "; ".join(f"{a.level}: {len(a.prediction.scores)} detection(s), {a.seconds:.2f} s"
                        + (f" ({a.compiled} compiled)" if a.compiled else "") for a in answers)
    return (*pictures, summary)

  with gr.Blocks(title="SAM3-I (JAX)", analytics_enabled=False) as page:
    state = gr.State(empty)
    gr.Markdown(f"## SAM3-I in JAX: segment with a concept, a simple or a complex instruction\n"
                f"Model {demo.describe()}. Click two opposite corners on the image to add an "
                "exemplar box.")
    with gr.Row():
      with gr.Column():
        picture = gr.Image(label="Image (click two corners to add an exemplar box)",
                           type="numpy", format="png", interactive=False, elem_id="image")
        upload_button = gr.UploadButton("Upload an image", type="filepath", elem_id="upload")
        gallery = gr.Gallery(value=[(str(EXAMPLES / e["image"]), e["concept"]) for e in shown],
                             label="Examples", columns=len(shown), height=140,
                             allow_preview=False, elem_id="examples")
        with gr.Row():
          kind = gr.Radio(["positive", "negative"], value="positive", label="Next box",
                          elem_id="box_kind")
          clear = gr.Button("Clear boxes", elem_id="clear_boxes")
        exemplar_list = gr.Markdown(_exemplar_list([]), elem_id="exemplars")
      with gr.Column():
        prompt = gr.Textbox(label="Prompt", placeholder="mug / the mug on the left / something "
                            "to drink coffee from", elem_id="prompt")
        with gr.Row():
          level = gr.Radio(demo.levels, value=Level.CONCEPT.value, label="Level",
                           elem_id="level")
          threshold = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Score threshold",
                                elem_id="threshold")
        run = gr.Button("Segment", variant="primary", elem_id="segment")
        status = gr.Markdown("pick an example or upload an image", elem_id="status")
        result = gr.Image(label="Masks and boxes", type="numpy", interactive=False,
                          elem_id="result")
        table = gr.HTML(elem_id="detections")
        files = gr.File(label="Download: COCO results JSON, PNG masks", file_count="multiple",
                        interactive=False, elem_id="downloads")
    gr.Markdown("### The three levels side by side")
    with gr.Row():
      level_prompts = [gr.Textbox(label=f"{name} prompt", elem_id=f"prompt_{name}")
                       for name in LEVELS]
    compare_button = gr.Button("Compare the levels", elem_id="compare")
    compare_status = gr.Markdown(elem_id="compare_status")
    with gr.Row():
      level_pictures = [gr.Image(label=name, type="numpy", interactive=False,
                                 elem_id=f"result_{name}") for name in LEVELS]

    loaded = [state, picture, exemplar_list, *level_prompts, prompt, status]
    upload_button.upload(guarded(upload, len(loaded)), upload_button, loaded)
    gallery.select(guarded(pick_example, len(loaded)), None, loaded)
    picture.select(guarded(click, 4), [state, kind], [state, picture, exemplar_list, status])
    clear.click(guarded(clear_boxes, 4), state, [state, picture, exemplar_list, status])
    run.click(guarded(segment, 4), [state, prompt, level, threshold],
              [result, table, files, status])
    prompt.submit(guarded(segment, 4), [state, prompt, level, threshold],
                  [result, table, files, status])
    compare_button.click(guarded(compare, 4), [state, threshold, *level_prompts],
                         [*level_pictures, compare_status])
  return page


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m sam3i_jax.app", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default=str(DEFAULT_MODEL),
                      help="a converted or trained model directory (default: the demo's tiny "
                      "model)")
  parser.add_argument("--host", default="127.0.0.1")
  parser.add_argument("--port", type=int, default=7860)
  args = parser.parse_args(argv)
  try:
    demo = Demo.from_pretrained(args.model)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"model {demo.describe()}; serving http://{args.host}:{args.port}", flush=True)
  # system fonts: the page loads nothing from outside the server
  theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])
  build_page(demo).launch(server_name=args.host, server_port=args.port, theme=theme,
                          ssr_mode=False, footer_links=[], quiet=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
