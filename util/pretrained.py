"""Models ready to sample in Python: a checkpoint built by the settings it stores, or a released model by name.

    from util.pretrained import load_checkpoint_model, load_pretrained
    pipe = load_checkpoint_model("quickstart_out/checkpoint-last.pth")    # any checkpoint of main.py
    images = pipe.generate([0, 1, 2], seed=0)                            # uint8 [3, H, W, 3]
    pipe = load_pretrained("transdiff_l", device="cuda")                 # downloads what is missing

A checkpoint of `main.py` stores the flags it was trained with (``args``); the model and tokenizer are built from
them (keyword overrides win, e.g. ``vae_path=`` when the VAE moved), and a checkpoint that does not fit names the
settings it was trained with. Released models are built from their entry in `util.presets` (the authors'
checkpoints store the original code's flags, some of them wrong: ``--patch_size 1`` for MRAR).
"""
from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.samplers import SAMPLERS
from models.tokenizers import build_tokenizer
from models.transdiff import TRANSDIFF_MODELS, TransDiff
from util.checkpoint import check_finite, check_fits, load_checkpoint, select_weights, trained_with
from util.eval.images import to_uint8
from util.eval.layout import image_noise
from util.execution.precision import autocast_context, decode_images, resolve_precision
from util.presets import SAMPLING_PRESETS
from util.run_state import find_resume_checkpoint

# Constructor arguments of a TransDiff that come from flags of the same name.
MODEL_FLAGS = ("img_size", "patch_size", "vae_embed_dim", "vae_stride", "label_drop_prob", "class_num",
               "attn_dropout", "proj_dropout", "buffer_size", "diffloss_w", "num_sampling_steps",
               "diffusion_batch_mul", "grad_checkpointing", "mrar")
SAMPLING_FLAGS = ("sampler", "num_sampling_steps", "cfg", "cfg_interval", "scale_0", "scale_1")


@functools.cache
def default_settings() -> dict:
    """Every flag of `main.py` at its default."""
    from util.settings import get_args_parser  # the parser imports every registry; only needed here
    return vars(get_args_parser().parse_args([]))


def build_model(settings: Mapping[str, Any]) -> TransDiff:
    """The TransDiff that a run's flags describe (``model`` and `MODEL_FLAGS`), on the CPU, freshly initialised."""
    return TRANSDIFF_MODELS[settings["model"]](**{name: settings[name] for name in MODEL_FLAGS if name in settings})


@dataclass
class Pipeline:
    """A model in eval mode with its tokenizer, the settings it was built from and its default sampling."""

    model: TransDiff
    tokenizer: torch.nn.Module
    settings: dict   # every flag: defaults, then the checkpoint's, then the caller's overrides
    source: str      # the checkpoint file and which weights ('model_ema' or 'model')

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def sampling(self, **overrides) -> dict:
        """The sampling settings (`SAMPLING_FLAGS`): the stored ones, then ``overrides``; a deterministic sampler runs
        with the scales given here or 1.0, as ``--preset`` does (stored scales are a stochastic sampler's)."""
        unknown = sorted(set(overrides) - set(SAMPLING_FLAGS))
        if unknown:
            raise TypeError(f"unknown sampling setting(s) {', '.join(unknown)}; "
                            f"choose from {', '.join(SAMPLING_FLAGS)}")
        chosen = {name: self.settings[name] for name in SAMPLING_FLAGS} | overrides
        if not SAMPLERS[chosen["sampler"]].stochastic:
            chosen |= {name: overrides.get(name, 1.0) for name in ("scale_0", "scale_1")}
        return chosen

    @torch.no_grad()
    def generate(self, labels: Sequence[int], seed: int = 0, first_index: int = 0, *,
                 return_stages: bool = False, **sampling) -> np.ndarray | list[np.ndarray]:
        """Images of `labels` as uint8 [B, H, W, 3] (MRAR with ``return_stages``: one array per stage).

        Image ``b`` starts from the noise of evaluation image ``first_index + b`` under ``seed``, as
        ``main.py --evaluate --seed`` draws it. ``sampling`` overrides the stored sampling flags (`sampling`).
        """
        chosen = self.sampling(**sampling)
        device = self.device
        precision = resolve_precision("auto", device.type)
        labels = torch.as_tensor(list(labels), dtype=torch.long, device=device)  # [B]
        with autocast_context(precision, device.type)():
            latents = self.model.samples(
                labels, chosen["num_sampling_steps"], cfg=chosen["cfg"], sampler=chosen["sampler"],
                scale_0=chosen["scale_0"], scale_1=chosen["scale_1"], cfg_interval=chosen["cfg_interval"],
                generator=image_noise(seed, range(first_index, first_index + len(labels))),
                return_stages=return_stages)
        stages = latents if return_stages else [latents]
        images = [to_uint8(decode_images(self.tokenizer, stage.float(), precision, device)) for stage in stages]
        return images if return_stages else images[0]


def load_checkpoint_model(path: str, device: str | torch.device = "cpu", use_ema: bool = True,
                          **overrides) -> Pipeline:
    """The model and tokenizer of a checkpoint, built by the flags it stores (``overrides`` win), with its weights
    (the EMA's unless ``use_ema=False``) loaded strictly.

    Raises ValueError when the checkpoint stores no settings and none are given, or when its weights do not fit the
    model of those settings (the message names the settings the checkpoint was trained with).
    """
    checkpoint = load_checkpoint(path)
    stored = checkpoint.get("args") or {}
    if not stored and "model" not in overrides:
        raise ValueError(f"{path} stores no settings ('args'): pass the flags of its model, e.g. "
                         "load_checkpoint_model(path, model='transdiff_large', img_size=256)")
    settings = default_settings() | dict(stored) | overrides
    weights, source = select_weights(checkpoint, use_ema=use_ema)
    check_finite(weights, f"{path} ({source})")
    model = build_model(settings)
    try:
        check_fits(weights, model.state_dict())
    except ValueError as error:
        raise ValueError(f"{path}: {error}\n{trained_with(checkpoint)}") from None
    model.load_state_dict(weights, strict=True)
    tokenizer = build_tokenizer(settings["tokenizer"], vae_path=settings["vae_path"],
                                vae_embed_dim=settings["vae_embed_dim"], vae_stride=settings["vae_stride"])
    return Pipeline(model.to(device).eval(), tokenizer.to(device), settings, f"{path} ({source})")


def released_settings(name: str) -> dict:
    """The flags of released model `name` (a key of `util.presets.SAMPLING_PRESETS`) with its sampling preset: the
    maruyama sampler, 100 steps, the preset's cfg and scales, the KL-16 tokenizer."""
    preset = SAMPLING_PRESETS[name]
    return {"model": preset.model, "mrar": preset.mrar, "patch_size": 2 if preset.mrar else 1,
            "img_size": preset.img_size, "class_num": 1000, "tokenizer": "kl16", "vae_embed_dim": 16,
            "vae_stride": 16, "sampler": "maruyama", "num_sampling_steps": 100, "cfg": preset.cfg,
            "cfg_interval": None, "scale_0": preset.scale_0, "scale_1": preset.scale_1}


def weights_file(name_or_path: str, load_step: str = "last") -> str:
    """The checkpoint file of ``--init_from``: a file, a run folder's ``checkpoint-<load_step>.pth``, or a released
    model's name (fetched into the Hugging Face cache when missing)."""
    if os.path.exists(name_or_path):
        path = find_resume_checkpoint(name_or_path, load_step)  # the file, or the folder's checkpoint
        if path is None:
            raise FileNotFoundError(f"{name_or_path}: no checkpoint-{load_step}.pth in this folder")
        return path
    if name_or_path in SAMPLING_PRESETS:
        from util.released import fetch  # the Hub client, only for released weights
        return str(fetch(name_or_path))
    raise FileNotFoundError(f"{name_or_path}: no such file or folder, and not a released model "
                            f"({', '.join(SAMPLING_PRESETS)})")


def load_pretrained(name: str, device: str | torch.device = "cpu", **overrides) -> Pipeline:
    """Released model `name` (``transdiff_l``, ``transdiff_h_mrar``, ...: `util.presets.SAMPLING_PRESETS`) with the
    KL-16 VAE, both fetched into the Hugging Face cache when missing (`util.released.fetch`: ``HF_ENDPOINT``,
    ``HF_HUB_OFFLINE`` and ``HF_HOME`` apply), and the preset's sampling settings; ``overrides`` win."""
    if name not in SAMPLING_PRESETS:
        raise ValueError(f"unknown released model {name!r}; choose from {', '.join(SAMPLING_PRESETS)}")
    from util.released import fetch  # the Hub client, only for released weights
    settings = released_settings(name) | {"vae_path": str(fetch("kl16"))} | overrides
    return load_checkpoint_model(str(fetch(name)), device, **settings)
