"""The web demo (`python -m sam3i_jax.app`): its checks and downloads in Python, and the page
itself served on 127.0.0.1 and driven in headless Chromium (Debian's chromium and chromedriver,
installed by `make test`), compared with `python -m sam3i_jax.predict` and the Predictor."""

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import types
import urllib.request
import zipfile

import numpy as np
import pytest
from PIL import Image

from sam3i_jax import app
from sam3i_jax.predict import Predictor, coco_results

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
MUG = app.EXAMPLES / "mug.jpg"
UPLOAD_INPUT = 'input[type=file][data-testid="Upload an image-upload-button"]'
WAIT_S = 240  # any one step of the page (the first answer of a level compiles its programs)


@pytest.fixture(scope="module")
def demo():
  return app.Demo.from_pretrained(str(app.DEFAULT_MODEL))


def test_the_library_imports_no_gradio():
  code = ("import sys, sam3i_jax, sam3i_jax.predict, sam3i_jax.train.loop; "
          "bad = [m for m in ('gradio', 'torch', 'tensorflow', 'scipy') if m in sys.modules]; "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_read_image_names_the_file_and_the_fault(tmp_path):
  corrupt = tmp_path / "holiday.png"
  corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
  with pytest.raises(app.InputError, match=r"holiday.png is not an image that can be read"):
    app.read_image(str(corrupt))
  huge = tmp_path / "huge.png"
  Image.new("1", (8000, 6000)).save(huge)  # 48 MP, a few kB on disk
  with pytest.raises(app.InputError, match=r"huge.png is 8000 x 6000 pixels \(48.0 MP\); the demo "
                     r"takes images up to 40 MP"):
    app.read_image(str(huge))
  grey = tmp_path / "grey.png"
  Image.new("L", (30, 20), 7).save(grey)
  assert app.read_image(str(grey)).shape == (20, 30, 3)


def test_bad_prompts_and_levels_get_their_message(demo):
  image = app.read_image(str(MUG))
  with pytest.raises(app.InputError, match="the concept prompt is empty"):
    demo.answer(image, "  ", "concept", 0.5, [])
  with pytest.raises(app.InputError, match="no image"):
    demo.answer(None, "mug", "concept", 0.5, [])
  sam3 = app.Demo(types.SimpleNamespace(config=types.SimpleNamespace(adapters=False)), "m/sam3")
  assert sam3.levels == ["concept"]
  with pytest.raises(app.InputError, match="the complex level needs a SAM3-I model .* m/sam3 "
                     "holds SAM 3"):
    sam3.answer(image, "something to drink from", "complex", 0.5, [])


def test_exemplar_boxes_are_normalised_centre_size():
  boxes, labels = app.normalised_boxes(
      [app.Exemplar((10, 20, 50, 40), True), app.Exemplar((0, 0, 200, 100), False)], (100, 200))
  np.testing.assert_allclose(boxes, [[0.15, 0.3, 0.2, 0.2], [0.5, 0.5, 1.0, 1.0]])
  np.testing.assert_array_equal(labels, [True, False])


def test_answers_equal_the_predictor_compile_once_and_download(demo, tmp_path):
  mug = app.read_image(str(MUG))
  exemplar = app.Exemplar((150.0, 30.0, 205.0, 95.0), True)
  first = demo.answer(mug, "mug", "concept", 0.4, [exemplar])
  boxes, labels = app.normalised_boxes([exemplar], mug.shape[:2])
  expected = demo.predictor.predict(mug, "mug", boxes, labels, threshold=0.4)
  np.testing.assert_array_equal(first.prediction.scores, expected.scores)
  np.testing.assert_array_equal(first.prediction.masks, expected.masks)
  # another image size, text and box of the same bucket: every image is resized to the model's
  # input, so nothing compiles again
  wide = np.asarray(Image.fromarray(mug).resize((300, 180)))
  second = demo.answer(wide, "car", "concept", 0.4, [app.Exemplar((5, 5, 60, 90), False)])
  assert second.compiled == 0 and "no compilation" in second.timing()
  assert second.prediction.image_size == (180, 300)

  results, masks = demo.downloads(first, "mug.jpg")
  with open(results) as f:
    assert json.load(f) == json.loads(json.dumps(
        coco_results(first.prediction, 1, "mug.jpg", 1, "mug")))
  with zipfile.ZipFile(masks) as archive:
    names = archive.namelist()
    assert len(names) == len(first.prediction.scores) > 0
    for name, mask in zip(names, first.prediction.masks):
      np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(archive.read(name)))) > 0,
                                    mask)


# --- the page in a browser ------------------------------------------------------------------


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
  """`python -m sam3i_jax.app` on a free local port; stopped at the end."""
  port = _free_port()
  log = open(tmp_path / "server.log", "w")
  process = subprocess.Popen([sys.executable, "-m", "sam3i_jax.app", "--port", str(port)],
                             stdout=log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}/"
  try:
    deadline = time.time() + 180
    while True:
      if process.poll() is not None:
        pytest.fail(f"the app exited ({process.returncode}):\n{(tmp_path / 'server.log').read_text()}")
      try:
        with urllib.request.urlopen(url, timeout=5) as response:
          if response.status == 200:
            break
      except OSError:
        pass
      if time.time() > deadline:
        pytest.fail(f"the app did not answer in 180 s:\n{(tmp_path / 'server.log').read_text()}")
      time.sleep(1)
    yield types.SimpleNamespace(url=url, process=process, log=tmp_path / "server.log")
  finally:
    process.terminate()
    try:
      process.wait(timeout=20)
    except subprocess.TimeoutExpired:
      process.kill()
    log.close()


@pytest.fixture
def browser():
  if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    message = (f"{CHROMIUM} and {CHROMEDRIVER} are needed (`make test` installs Debian's "
               "chromium and chromium-driver as root)")
    if os.environ.get("CI"):
      pytest.fail(message)
    pytest.skip(message)
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service

  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-extensions", "--no-first-run",
               "--window-size=1400,1800"):
    options.add_argument(flag)
  driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
  driver.set_page_load_timeout(120)
  try:
    yield driver
  finally:
    driver.quit()


def _text(driver, element_id: str) -> str:
  from selenium.webdriver.common.by import By
  return driver.find_element(By.ID, element_id).text


def _wait_for(driver, server, element_id: str, pattern: str, before: str | None = None) -> str:
  """The element's text once it matches `pattern` (and differs from `before`); fails at once if
  the server has stopped."""
  from selenium.webdriver.support.ui import WebDriverWait
  found = {}

  def ready(d):
    if server.process.poll() is not None:
      pytest.fail(f"the app exited ({server.process.returncode}):\n{server.log.read_text()}")
    text = _text(d, element_id)
    if re.search(pattern, text) and text != before:
      found["text"] = text
      return True
    return False

  try:
    WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(ready)
  except Exception:
    pytest.fail(f"#{element_id} never matched {pattern!r}; it reads {_text(driver, element_id)!r}")
  return found["text"]


def _table(driver) -> list[list[float]]:
  from selenium.webdriver.common.by import By
  return [[float(cell.text) for cell in row.find_elements(By.TAG_NAME, "td")]
          for row in driver.find_elements(By.CSS_SELECTOR, "#detections tbody tr")]


def _expected_rows(prediction) -> list[list[float]]:
  """The rows the table should show: index, score (3 places), box corners (1 place), mask px."""
  return [[k, round(float(s), 3), *[round(float(v), 1) for v in box], int(mask.sum())]
          for k, (s, box, mask) in enumerate(zip(prediction.scores, prediction.boxes_xyxy,
                                                 prediction.masks))]


def _assert_rows(shown, expected):
  assert len(shown) == len(expected), (shown, expected)
  np.testing.assert_allclose(np.asarray(shown, float), np.asarray(expected, float), atol=0.051)


def _upload(driver, path):
  from selenium.webdriver.common.by import By
  driver.find_element(By.CSS_SELECTOR, UPLOAD_INPUT).send_keys(str(path))


def _segment(driver, server, before: str) -> str:
  from selenium.webdriver.common.by import By
  driver.find_element(By.ID, "segment").click()
  return _wait_for(driver, server, "status", r"detection\(s\) above", before)


# Alone: the app, its browser, the CLI and the test's own model are four processes, which beside
# the full-size tests' ~14 GB worker went over CI's 24 GB.
@pytest.mark.alone
def test_page_in_a_browser_matches_the_cli(server, browser, tmp_path):
  from selenium.webdriver.common.action_chains import ActionChains
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait

  # what the command line finds on the same image and prompt (COCO results, as the page offers)
  folder = tmp_path / "images"
  folder.mkdir()
  shutil.copy(MUG, folder / "mug.jpg")
  subprocess.run([sys.executable, "-m", "sam3i_jax.predict", "--model", str(app.DEFAULT_MODEL),
                  "--images", str(folder), "--text", "mug", "--batch-size", "1",
                  "--output", str(tmp_path / "cli.json")], check=True, capture_output=True,
                 timeout=300)
  with open(tmp_path / "cli.json") as f:
    cli = json.load(f)
  assert cli, "the prompt finds nothing: choose one that does, or the test proves little"

  browser.get(server.url)
  WebDriverWait(browser, 120).until(
      lambda d: d.find_elements(By.CSS_SELECTOR, UPLOAD_INPUT))

  # a corrupt upload gets its message, and the server goes on serving
  corrupt = tmp_path / "broken.png"
  corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))
  _upload(browser, corrupt)
  _wait_for(browser, server, "status", r"Error: broken\.png is not an image that can be read")

  _upload(browser, MUG)
  loaded = _wait_for(browser, server, "status", r"mug\.jpg: 256 x 256 px")
  prompt = browser.find_element(By.CSS_SELECTOR, "#prompt textarea")
  prompt.send_keys("mug")
  status = _segment(browser, server, loaded)
  assert f"concept prompt 'mug' with 0 exemplar box(es): {len(cli)} detection(s)" in status
  shown = _table(browser)
  cli_rows = [[k, round(d["score"], 3), d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2],
               d["bbox"][1] + d["bbox"][3]] for k, d in enumerate(cli)]
  _assert_rows([row[:6] for row in shown], cli_rows)
  links = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "#downloads a")]
  results_link = next(link for link in links if link and link.endswith(".results.json"))
  with urllib.request.urlopen(results_link, timeout=30) as response:
    downloaded = json.load(response)
  assert [d["segmentation"] for d in downloaded] == [d["segmentation"] for d in cli]
  np.testing.assert_allclose([d["score"] for d in downloaded], [d["score"] for d in cli],
                             rtol=1e-6)
  np.testing.assert_allclose([d["bbox"] for d in downloaded], [d["bbox"] for d in cli],
                             atol=1e-4)

  # a box drawn on the image (two clicks) reaches the model
  browser.find_element(By.CSS_SELECTOR, "#box_kind input[value=negative]").click()
  image = browser.find_element(By.CSS_SELECTOR, "#image img")
  rendered = image.size["width"]
  natural = browser.execute_script("return arguments[0].naturalWidth", image)
  corners = [(-40, -40), (20, 30)]  # offsets from the image's centre, in CSS pixels
  for dx, dy in corners:
    ActionChains(browser).move_to_element_with_offset(image, dx, dy).click().perform()
    time.sleep(0.5)
  listed = _wait_for(browser, server, "exemplars", r"1\. negative \[")
  box = [float(v) for v in re.search(r"negative \[([^\]]+)\]", listed).group(1).split(",")]
  scale = natural / rendered
  centre = natural / 2
  expected_box = [centre + corners[0][0] * scale, centre + corners[0][1] * scale,
                  centre + corners[1][0] * scale, centre + corners[1][1] * scale]
  np.testing.assert_allclose(box, expected_box, atol=2 * scale + 1)
  status = _segment(browser, server, status)
  assert "with 1 exemplar box(es)" in status

  predictor = Predictor.from_pretrained(str(app.DEFAULT_MODEL))
  mug = app.read_image(str(MUG))
  boxes, labels = app.normalised_boxes([app.Exemplar(tuple(box), False)], mug.shape[:2])
  with_box = predictor.predict(mug, "mug", boxes, labels)
  without = predictor.predict(mug, "mug")
  assert _expected_rows(with_box) != _expected_rows(without), "the box changes nothing"
  _assert_rows(_table(browser), _expected_rows(with_box))

  # the three levels side by side, from an example's prompts
  browser.find_element(By.ID, "clear_boxes").click()
  _wait_for(browser, server, "exemplars", r"no exemplar boxes")
  browser.find_elements(By.CSS_SELECTOR, "#examples button.thumbnail-item")[0].click()
  example = app.examples()[0]
  _wait_for(browser, server, "status", re.escape(f"{example['image']}: 256 x 256 px"))
  browser.find_element(By.ID, "compare").click()
  summary = _wait_for(browser, server, "compare_status", r"complex: \d+ detection")
  image = app.read_image(str(app.EXAMPLES / example["image"]))
  for level in app.LEVELS:
    found = len(predictor.predict(image, example[level], level=level).scores)
    assert f"{level}: {found} detection(s)" in summary, (level, summary)

  shot = tmp_path / "app.png"
  assert browser.save_screenshot(str(shot))
  assert Image.open(shot).size[0] >= 1000
