"""The demo page in a real browser: `demo_page.py` serves a tiny checkpoint on a free port, and headless Chromium
(Debian's chromium and chromium-driver, driven by Selenium, which downloads nothing) picks a class, a sampler, steps,
cfg and a seed, presses Generate and gets the images the pipeline makes for them: one grid for a 1-step model, the
four stages in order for an MRAR model.

The screenshot in docs/evaluation.md is retaken with the same browser, against the quickstart's checkpoint:

    .venv/bin/python -m tests.e2e.test_demo_page quickstart_out/checkpoint-last.pth docs/demo_page.png
"""
import base64
import contextlib
import io
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.runs import TINY

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
    reason="needs Debian's /usr/bin/chromium and /usr/bin/chromedriver: apt-get install chromium chromium-driver")
pytest.importorskip("flask", reason="the demo page needs Flask: pip install -r requirements-demo.txt")
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium: pip install -r requirements-dev.txt")

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.select import Select  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402

import demo_page  # noqa: E402
from util.checkpoint import save_checkpoint  # noqa: E402
from util.pretrained import build_model, load_checkpoint_model  # noqa: E402
from util.settings import get_args_parser, resolve_args  # noqa: E402

FORM = {"classes": ["2"], "per_class": 2, "sampler": "euler", "steps": 2, "cfg": "1.5", "seed": 7}


def write_tiny_checkpoint(path: Path, mrar: bool) -> Path:
    """A freshly built transdiff_tiny (16 px, 3 classes) with the settings main.py would store for it."""
    flags = [*TINY, "--output_dir", str(path.parent), *(["--mrar", "--patch_size", "2"] if mrar else [])]
    settings = vars(resolve_args(get_args_parser().parse_args(flags)))
    weights = build_model(settings).state_dict()
    save_checkpoint(str(path), {"model": weights, "model_ema": weights, "args": settings, "epoch": 0})
    return path


def start_browser(width: int = 1100, height: int = 800):
    """Headless Chromium of the system, by an explicit driver and binary: Selenium Manager is never asked."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={width},{height}"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


@contextlib.contextmanager
def served(pipe):
    """The page of `pipe` on 127.0.0.1 at a free port, served by a thread: yields its URL."""
    server = demo_page.serve(demo_page.build_page(pipe, demo_page.class_names(pipe)), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        thread.join()


def submit(browser, url: str, form: dict) -> None:
    """Open the page, fill in the form like a user and press Generate."""
    browser.get(url)
    classes = Select(browser.find_element(By.ID, "classes"))
    classes.deselect_all()
    for value in form["classes"]:
        classes.select_by_value(value)
    Select(browser.find_element(By.ID, "sampler")).select_by_value(form["sampler"])
    for name in ("per_class", "steps", "cfg", "seed"):
        field = browser.find_element(By.ID, name)
        field.clear()
        field.send_keys(str(form[name]))
    browser.find_element(By.ID, "generate").click()


def loaded_images(browser, timeout: float = 30):
    """The page's result images once the answer has come and every one has loaded."""
    def ready(driver):
        images = driver.find_elements(By.CSS_SELECTOR, "img.result")
        loaded = images and all(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0",
                                                      image) for image in images)
        return images if loaded else False
    return WebDriverWait(browser, timeout).until(ready)


def decoded(source: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert source.startswith(prefix), source[:60]
    return np.array(Image.open(io.BytesIO(base64.b64decode(source[len(prefix):]))).convert("RGB"))


@pytest.fixture(scope="module")
def browser():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SE_OFFLINE", "true")
        driver = start_browser()
    yield driver
    driver.quit()


@pytest.fixture(scope="module", params=[False, True], ids=["one_step", "mrar"])
def page(request, tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("demo") / "checkpoint-last.pth", mrar=request.param)
    pipe = load_checkpoint_model(str(path))
    with served(pipe) as url:
        yield pipe, url


def test_the_page_shows_the_images_of_the_form(browser, page):
    pipe, url = page
    submit(browser, url, FORM)
    images = loaded_images(browser)

    labels = [int(FORM["classes"][0])] * FORM["per_class"]
    sampling = dict(sampler=FORM["sampler"], num_sampling_steps=FORM["steps"], cfg=float(FORM["cfg"]))
    mrar = pipe.model.mrar
    expected = pipe.generate(labels, seed=FORM["seed"], return_stages=mrar, **sampling)
    expected = expected if mrar else [expected]  # one uint8 [B, H, W, 3] per stage
    assert len(images) == len(expected) == (4 if mrar else 1)
    captions = [element.text for element in browser.find_elements(By.TAG_NAME, "figcaption")]
    if mrar:
        assert [caption.split(":")[0] for caption in captions] == [f"Stage {k} of 4" for k in (1, 2, 3, 4)]
        assert "references: stages 1, 2, 3" in captions[3]
    for image, stage in zip(images, expected):
        shown = decoded(image.get_attribute("src"))  # [H', W', 3]: one row of per_class images, enlarged
        width = browser.execute_script("return arguments[0].naturalWidth", image)
        size = stage.shape[1]
        scale = shown.shape[0] // (size + 4)  # image_grid pads 2 px on each side of a cell, then enlarges
        assert width == shown.shape[1] and size * scale >= demo_page.MIN_SHOWN_PX
        for b in range(FORM["per_class"]):
            top, left = 2 * scale, (2 + b * (size + 2)) * scale
            cell = shown[top:top + size * scale:scale, left:left + size * scale:scale]  # [H, W, 3]
            np.testing.assert_array_equal(cell, stage[b])
    assert browser.find_element(By.ID, "seed").get_attribute("value") == str(FORM["seed"])


def test_a_bad_form_says_what_is_wrong(browser, page):
    _, url = page
    submit(browser, url, FORM | {"sampler": "maruyama", "steps": 1})
    error = WebDriverWait(browser, 30).until(lambda driver: driver.find_elements(By.ID, "error"))[0]
    assert "at least 2" in error.text
    assert not browser.find_elements(By.CSS_SELECTOR, "img.result")


def take_screenshot(checkpoint: str, path: str) -> None:
    """The page of `checkpoint` with a few generated classes, as a PNG of the page at `path`."""
    os.environ.setdefault("SE_OFFLINE", "true")
    pipe = load_checkpoint_model(checkpoint)
    browser = start_browser()
    try:
        with served(pipe) as url:
            submit(browser, url, {"classes": ["0", "3", "7"], "per_class": 4, "sampler": "euler", "steps": 10,
                                  "cfg": "1.25", "seed": 1})
            loaded_images(browser, timeout=120)
            viewport = {"width": 1000, "height": 400, "deviceScaleFactor": 1, "mobile": False}
            browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", viewport)  # shorter than the page
            viewport["height"] = browser.execute_script("return document.documentElement.scrollHeight")
            browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", viewport)  # the page in full
            browser.save_screenshot(path)
    finally:
        browser.quit()
    Image.open(path).convert("RGB").quantize(colors=128).save(path, optimize=True)  # a modest file


if __name__ == "__main__":
    take_screenshot(*sys.argv[1:3])
