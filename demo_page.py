"""A demo page in the browser: pick classes, sampler, steps, cfg and seed, and see the images; with an MRAR model,
every stage in order.

    pip install -r requirements-demo.txt                     # Flask, optional: not in requirements.txt
    python demo_page.py                                      # the quickstart's digits model (assets/)
    python demo_page.py --released transdiff_l --device cuda # a released model, fetched when missing

The page is one HTML form served by Flask (`build_page`); its answer is the same page with the images, as PNGs
enlarged to at least `MIN_SHOWN_PX` per image (nearest neighbour), one row per class. Image ``b`` of an answer starts
from the noise of evaluation image ``b`` under the seed, as ``main.py --evaluate --seed`` draws it, so a form gives
the same images every time. Settings the form does not show (``scale_0``, ``scale_1``, ``cfg_interval``) are the
checkpoint's, and the page says which.
"""
from __future__ import annotations

import argparse
import base64
import io
import threading
import time
from pathlib import Path

import numpy as np
import torch

from models.samplers import SAMPLERS
from util.data.class_map import imagenet_classes
from util.distributed import resolve_device_type
from util.errors import RunError, run_cli
from util.eval.images import grid_zoom, image_grid
from util.presets import SAMPLING_PRESETS
from util.pretrained import Pipeline, load_checkpoint_model, load_pretrained

DIGITS_CHECKPOINT = str(Path(__file__).resolve().parent / "assets" / "digits_tiny.pth")  # the quickstart model
MIN_SHOWN_PX = 128     # small images (the 16 px digits) are enlarged to at least this many pixels
MAX_IMAGES = 64        # per request: classes x images per class
IMAGENET_DEMO_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)  # MAR's demo classes: the first choice of the page

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>TransDiff demo</title>
<style>
 body { font-family: sans-serif; margin: 16px; display: flex; gap: 24px; align-items: flex-start; }
 form { display: grid; gap: 8px; width: 280px; flex: none; }
 label { display: grid; gap: 2px; font-size: 14px; }
 select[multiple] { height: 180px; }
 button { font-size: 16px; padding: 6px; }
 .note { font-size: 13px; color: #555; }
 .error { color: #b00; }
 figure { margin: 0 0 16px 0; }
 img { image-rendering: pixelated; }
</style></head>
<body>
<form method="get" action="/">
 <h2>TransDiff demo</h2>
 <div class="note">{{ checkpoint }} on {{ device }}{% if mrar %}, MRAR ({{ num_stages }} stages){% endif %}</div>
 <label>Classes (one row each)
  <select id="classes" name="classes" multiple>
  {% for index, name in classes %}
   <option value="{{ index }}"{% if index in form.classes %} selected{% endif %}>{{ name }}</option>
  {% endfor %}
  </select></label>
 <label>Images per class <input id="per_class" name="per_class" type="number" min="1" max="{{ max_images }}"
   value="{{ form.per_class }}"></label>
 <label>Sampler <select id="sampler" name="sampler">
  {% for name, spec in samplers %}
   <option value="{{ name }}"{% if name == form.sampler %} selected{% endif %}>{{ name }}
    ({{ "stochastic" if spec.stochastic else "deterministic" }}, at least {{ spec.min_steps }} step{{
    "s" if spec.min_steps > 1 }})</option>
  {% endfor %}
 </select></label>
 <label>Steps{% if mrar %} (per stage){% endif %}
  <input id="steps" name="steps" type="number" min="1" value="{{ form.steps }}"></label>
 <label>cfg (1 = no guidance{% if mrar %}; or one per stage, comma-separated{% endif %})
  <input id="cfg" name="cfg" value="{{ form.cfg }}"></label>
 <label>Seed <input id="seed" name="seed" type="number" min="0" value="{{ form.seed }}"></label>
 <button id="generate" type="submit">Generate</button>
 <div class="note">From the checkpoint: {{ fixed }}</div>
</form>
<main>
{% if error %}<p id="error" class="error">{{ error }}</p>{% endif %}
{% if stages %}
 <p id="summary">{{ summary }}</p>
 {% if mrar %}<p class="note">Multi-reference autoregression: stage 1 draws from the class label alone; each later
  stage reads the images of all earlier stages as its references. The stages are shown in order; the last one is
  the result.</p>{% endif %}
 {% for stage in stages %}
 <figure><figcaption>{{ stage.caption }}</figcaption>
  <img class="result" src="{{ stage.src }}" alt="{{ stage.caption }}"></figure>
 {% endfor %}
{% endif %}
</main>
</body></html>
"""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("demo_page.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", default=DIGITS_CHECKPOINT,
                       help="a checkpoint of main.py (default: the quickstart model shipped with the repository)")
    model.add_argument("--released", default=None, choices=sorted(SAMPLING_PRESETS),
                       help="a released model, fetched into the Hugging Face cache when missing")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda", "mps"),
                        help="default: cuda where available, else cpu")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", default=7860, type=int, help="port to listen on (0: a free one)")
    return parser


def class_names(pipe: Pipeline) -> list[str]:
    """ImageNet's names for a 1000-class model, else the class indices (the quickstart's digits are their own)."""
    class_num = pipe.settings["class_num"]
    if class_num == len(imagenet_classes()):
        return [f"{index}: {names}" for index, (_, names) in enumerate(imagenet_classes())]
    return [str(index) for index in range(class_num)]


def png_data_uri(images: np.ndarray, per_row: int) -> str:
    """uint8 images [N, H, W, 3] as one PNG grid (enlarged to at least MIN_SHOWN_PX per image), as a data: URI."""
    scale = grid_zoom(images.shape[1], MIN_SHOWN_PX)
    grid = image_grid(torch.from_numpy(images).permute(0, 3, 1, 2), per_row, scale=scale)  # from [N, 3, H, W]
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def form_defaults(settings: dict, class_num: int) -> dict:
    """The form as the page first shows it: the checkpoint's sampling settings and seed, a few classes."""
    classes = IMAGENET_DEMO_CLASSES if class_num == len(imagenet_classes()) else range(min(class_num, 10))
    cfg = settings["cfg"]
    return {"classes": [str(c) for c in classes], "per_class": "4" if settings["img_size"] <= 64 else "1",
            "sampler": settings["sampler"], "steps": str(settings["num_sampling_steps"]),
            "cfg": ",".join(map(str, cfg)) if isinstance(cfg, list) else str(cfg), "seed": str(settings["seed"])}


def whole_number(form: dict, name: str, low: int) -> int:
    try:
        value = int(form[name])
    except ValueError:
        raise ValueError(f"{name} {form[name]!r} is not a whole number") from None
    if value < low:
        raise ValueError(f"{name} must be at least {low}")
    return value


def read_form(form: dict, class_num: int) -> tuple[list[int], int, dict]:
    """The classes, images per class and `Pipeline.generate` keywords of a filled-in form; ValueError says what
    is wrong with it."""
    classes = [int(c) for c in form["classes"] if c.isdigit() and int(c) < class_num]
    if not classes:
        raise ValueError("pick at least one class")
    per_class = whole_number(form, "per_class", 1)
    if len(classes) * per_class > MAX_IMAGES:
        raise ValueError(f"at most {MAX_IMAGES} images at once: fewer classes or fewer images per class")
    sampler = form["sampler"]
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    try:
        cfg = [float(value) for value in form["cfg"].split(",")]
    except ValueError:
        raise ValueError(f"cfg {form['cfg']!r}: a number, or one per MRAR stage separated by commas") from None
    steps = whole_number(form, "steps", 1)
    if steps < SAMPLERS[sampler].min_steps:
        raise ValueError(f"the {sampler} sampler needs at least {SAMPLERS[sampler].min_steps} steps")
    sampling = {"seed": whole_number(form, "seed", 0), "sampler": sampler, "num_sampling_steps": steps,
                "cfg": cfg[0] if len(cfg) == 1 else cfg}
    return classes, per_class, sampling


def stage_captions(num_stages: int) -> list[str]:
    """What each MRAR stage read, in order (one stage: the images alone)."""
    if num_stages == 1:
        return ["Generated images, one row per class"]
    return [f"Stage {k} of {num_stages}: " + ("the class label alone, no reference yet" if k == 1 else
            f"references: stage{'s' if k > 2 else ''} {', '.join(map(str, range(1, k)))}")
            + (" (the result)" if k == num_stages else "") for k in range(1, num_stages + 1)]


def build_page(pipe: Pipeline, class_names: list[str]):
    """The demo page as a Flask app: GET / shows the form, and with the form's values also the images."""
    flask = require_flask()
    app = flask.Flask("demo_page")
    lock = threading.Lock()  # one generation at a time: the model and its device are shared by the requests
    settings, model = pipe.settings, pipe.model
    defaults = form_defaults(settings, len(class_names))
    fixed = (f"scale_0 {settings['scale_0']}, scale_1 {settings['scale_1']} (stochastic samplers), "
             f"cfg_interval {settings['cfg_interval'] or 'none (every step)'}")

    @app.get("/")
    def page():
        query = flask.request.args
        form = defaults | {name: query.get(name) for name in defaults if name in query}
        error, stages, summary = None, [], ""
        if "seed" in query:  # the form was sent
            form["classes"] = query.getlist("classes")
            try:
                classes, per_class, sampling = read_form(form, len(class_names))
                labels = [c for c in classes for _ in range(per_class)]  # one row per class
                with lock:
                    start = time.perf_counter()
                    images = pipe.generate(labels, return_stages=True, **sampling) if model.mrar else [
                        pipe.generate(labels, **sampling)]  # one uint8 [B, H, W, 3] per stage
                    seconds = time.perf_counter() - start
                stages = [{"caption": caption, "src": png_data_uri(stage, per_class)}
                          for caption, stage in zip(stage_captions(model.num_stages), images)]
                summary = f"{len(labels)} image(s) in {seconds:.1f} s on {pipe.device}"
            except ValueError as problem:
                error = str(problem)
        return flask.render_template_string(
            PAGE, checkpoint=pipe.source, device=pipe.device, mrar=model.mrar, num_stages=model.num_stages,
            classes=[(str(index), name) for index, name in enumerate(class_names)], samplers=list(SAMPLERS.items()),
            max_images=MAX_IMAGES, form=form, fixed=fixed, error=error, stages=stages, summary=summary)

    return app


def require_flask():
    try:
        import flask
    except ImportError:
        raise RunError("Flask is not installed: pip install -r requirements-demo.txt") from None
    return flask


def serve(app, host: str, port: int):
    """A threaded HTTP server of `app` (port 0: a free one, then ``server.server_port``); ``serve_forever()`` runs
    it, ``shutdown()`` stops it."""
    from werkzeug.serving import make_server  # Flask's own server library
    return make_server(host, port, app, threaded=True)


def load_pipeline(args) -> Pipeline:
    device = resolve_device_type(args.device)
    if args.released:
        return load_pretrained(args.released, device=device)
    return load_checkpoint_model(args.checkpoint, device)


def run_page(args) -> None:
    require_flask()  # before loading a model
    pipe = load_pipeline(args)
    server = serve(build_page(pipe, class_names(pipe)), args.host, args.port)
    print(f"demo_page.py: {pipe.source} on {pipe.device}: http://{args.host}:{server.server_port}/ "
          "(Ctrl-C stops)", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    run_cli("demo_page.py", lambda: run_page(get_args_parser().parse_args()))
