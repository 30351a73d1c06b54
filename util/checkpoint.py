"""Checkpoint files: atomic saving, safe loading, weight selection and finetune adaptation.

Format (the original's, ``util/misc.py::save_model`` of MAR/TransDiff)::

    {'model': state_dict, 'model_ema': state_dict, 'optimizer': ..., 'epoch': int,
     'args': dict, ['scaler': GradScaler state]}

The original pickles ``args`` as an ``argparse.Namespace``; we write a plain dict and accept both
on load. File names and the save/restore policy belong to `util.run_state`.

Loading never executes arbitrary pickles: ``torch.load(weights_only=True)`` with
``argparse.Namespace`` as the only extra allowed global; it first checks every record against the CRC-32 that
the zip format stores with it.
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from util.io import atomic_write

SAFE_GLOBALS = (argparse.Namespace,)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def save_checkpoint(path: str, state: Mapping[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically and durably (see :func:`atomic_write`).

    A crash at any point leaves either the old checkpoint or the new one, never a partial file. An
    ``argparse.Namespace`` under ``'args'`` is stored as a plain dict.
    """
    state = dict(state)
    if isinstance(state.get("args"), argparse.Namespace):
        state["args"] = vars(state["args"])
    atomic_write(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: str, map_location: Any = "cpu") -> dict:
    """Load a checkpoint dict without executing arbitrary pickles.

    Accepts our files and the original's (``args`` as ``argparse.Namespace``, converted to a dict
    here). Raises FileNotFoundError for a missing file, ValueError naming the file when it is not a
    checkpoint or holds objects outside the allow-list, and TypeError when it holds something other
    than a dict.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    in_zip_format = zipfile.is_zipfile(path)
    if in_zip_format:
        _verify_checksums(path)
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            # Memory-mapped: a rank's CPU copy of a large checkpoint is read on demand, not held whole.
            checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=in_zip_format)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise ValueError(f"{path} is not a PyTorch checkpoint (or is truncated): {error}") from error
        raise ValueError(_disallowed_globals_message(path)) from error
    except Exception as error:  # the unpickler fails in many ways on foreign bytes (IndexError, KeyError, ...)
        raise ValueError(f"{path} is not a PyTorch checkpoint (or is truncated): {error!r}") from error
    if not isinstance(checkpoint, dict):
        raise TypeError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    if isinstance(checkpoint.get("args"), argparse.Namespace):
        checkpoint["args"] = vars(checkpoint["args"])
    return checkpoint


def _verify_checksums(path: str) -> None:
    """Check every record of a zip-format checkpoint against the CRC-32 its writer stored (torch.load does not): a
    byte changed since the write, by the disk or a copy, is refused naming the file instead of loading silently."""
    try:
        with zipfile.ZipFile(path) as archive:
            corrupt = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a PyTorch checkpoint (or is truncated): {error!r}") from error
    if corrupt is not None:
        raise ValueError(f"{path} is corrupt: its record {corrupt} fails its CRC-32 checksum, so bytes changed "
                         "after it was written; use another copy or another checkpoint of the run")


def first_non_finite(state_dict: Mapping[str, Any]) -> str | None:
    """The key of the first floating-point tensor of `state_dict` that holds a NaN or an infinity, or None."""
    return next((key for key, value in state_dict.items() if isinstance(value, torch.Tensor)
                 and value.is_floating_point() and not bool(torch.isfinite(value).all())), None)


def check_finite(state_dict: Mapping[str, Any], source: str) -> None:
    """Raise ValueError naming `source` and the first tensor of `state_dict` that holds a NaN or an infinity: such
    weights sample black images and train at NaN, and nothing downstream would say why."""
    key = first_non_finite(state_dict)
    if key is not None:
        raise ValueError(f"{source}: tensor {key} holds non-finite values (NaN or infinity); the file is corrupt "
                         "or its run diverged")


def _disallowed_globals_message(path: str) -> str:
    try:
        names = ", ".join(sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path)))
    except Exception:  # not a zip checkpoint: foreign bytes, a truncated file or a legacy pickle
        return (f"{path} is not a PyTorch checkpoint in the zip format: it is truncated or foreign bytes, or a "
                "legacy pickle, which we refuse to unpickle because that can execute code")
    return (f"{path} contains pickled Python objects outside the allow-list ({names}). We refuse to "
            "unpickle arbitrary objects because that can execute code. If you trust the file, convert it once "
            "to tensors, state dicts and plain Python values (docs/reliability.md#foreign-checkpoints).")


def strip_wrapper_prefixes(state_dict: Mapping[str, Any]) -> dict:
    """Remove ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes from every key."""
    stripped = {}
    for key, value in state_dict.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        stripped[key] = value
    return stripped


def select_weights(checkpoint: Mapping[str, Any], use_ema: bool = True) -> tuple[dict, str]:
    """Pick the weights to load: ``(state_dict, source_key)``.

    ``'model_ema'`` when present and ``use_ema``, else ``'model'``; a bare state dict (every value a
    tensor) is returned as is with source ``'state_dict'``. Wrapper prefixes are stripped.
    """
    if use_ema and "model_ema" in checkpoint:
        source = "model_ema"
    elif "model" in checkpoint:
        source = "model"
    elif checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        return strip_wrapper_prefixes(checkpoint), "state_dict"
    else:
        raise ValueError(f"no weights in checkpoint: expected 'model', 'model_ema' or a bare state dict, "
                         f"found keys {sorted(checkpoint)[:10]}")
    return strip_wrapper_prefixes(checkpoint[source]), source


def adapt_state_dict(src_sd: Mapping[str, torch.Tensor], target_sd: Mapping[str, torch.Tensor],
                     model_for_width: Mapping[int, str] | None = None,
                     class_rows: Mapping[int, int] | None = None) -> tuple[dict, list[str]]:
    """Fit a checkpoint's state dict to a model whose shapes differ in the known finetune ways.

    For finetunes that start from a 1-step 256px checkpoint:

    * ``mask_token`` [1, 1, D] -> [1, M, D] (MRAR, M = 64): the token is copied into every slot.
    * ``z_proj.weight``/``z_proj.bias`` with another input width ([D, 16] -> [D, 64] for MRAR): the
      model's fresh initialisation is kept. The 1-step ``z_proj`` output is overwritten in the
      original, so it never receives gradients and carries nothing.
    * a ``*pos_embed*`` tensor [1, N, D] -> [1, M, D] with N and M perfect squares (the decoder's
      ``diffdecoder.net.diffusion_pos_embed_learned``, 256 -> 1024 for 512px): bicubic interpolation
      over the sqrt(N) x sqrt(N) grid (align_corners=False).

    For a finetune onto other classes (``class_rows`` given: model row -> checkpoint row), ``class_emb.weight`` is
    the model's fresh initialisation with the mapped rows copied from the checkpoint; the unconditional embedding
    (``fake_latent``) is kept as any other tensor. An empty mapping keeps every row fresh.

    Any other shape mismatch, missing or unexpected key raises ValueError listing them and explaining the
    usual flag mistakes (``model_for_width`` maps a width to the ``--model`` name to suggest). Returns the
    adapted state dict (keys of ``target_sd``) and one human-readable line per adapted tensor.
    """
    missing = sorted(set(target_sd) - set(src_sd))
    unexpected = sorted(set(src_sd) - set(target_sd))
    fresh_z_proj = _z_proj_input_changed(src_sd, target_sd)
    adapted, report, mismatched = {}, [], []
    for key, target in target_sd.items():
        if key not in src_sd:
            continue
        source = src_sd[key]
        if fresh_z_proj and key in ("z_proj.weight", "z_proj.bias"):
            adapted[key] = target.clone()
            report.append(f"{key}: checkpoint {list(source.shape)} vs model {list(target.shape)}, kept the "
                          "model's fresh initialisation (z_proj is untrained in the 1-step model)")
        elif key == CLASS_EMBEDDING and class_rows is not None and source.shape[1:] == target.shape[1:]:
            adapted[key], line = _mapped_class_rows(source, target, class_rows)
            report.append(line)
        elif source.shape == target.shape:
            adapted[key] = source
        elif _is_broadcastable_mask_token(key, source, target):
            adapted[key] = source.expand(-1, target.shape[1], -1).clone()  # [1, 1, D] -> [1, M, D]
            report.append(f"{key}: {list(source.shape)} -> {list(target.shape)}, "
                          f"token copied to all {target.shape[1]} slots")
        elif _is_resizable_pos_embed(key, source, target):
            adapted[key] = _interpolate_pos_embed(source, target.shape[1])
            report.append(f"{key}: {list(source.shape)} -> {list(target.shape)}, bicubic interpolation of "
                          f"the {math.isqrt(source.shape[1])}x{math.isqrt(source.shape[1])} grid")
        else:
            mismatched.append(f"{key}: checkpoint {list(source.shape)} vs model {list(target.shape)}")
    if missing or unexpected or mismatched:
        raise ValueError(_mismatch_message(src_sd, target_sd, missing, unexpected, mismatched, model_for_width or {}))
    return adapted, report


def check_fits(src_sd: Mapping[str, torch.Tensor], target_sd: Mapping[str, torch.Tensor],
               model_for_width: Mapping[int, str] | None = None) -> None:
    """Raise ValueError explaining every missing, unexpected and differently-shaped tensor (as `adapt_state_dict`
    does) unless `src_sd` loads strictly into a model whose state dict is `target_sd`."""
    missing = sorted(set(target_sd) - set(src_sd))
    unexpected = sorted(set(src_sd) - set(target_sd))
    mismatched = [f"{key}: checkpoint {list(src_sd[key].shape)} vs model {list(target.shape)}"
                  for key, target in target_sd.items() if key in src_sd and src_sd[key].shape != target.shape]
    if missing or unexpected or mismatched:
        raise ValueError(_mismatch_message(src_sd, target_sd, missing, unexpected, mismatched, model_for_width or {}))


# The flags that decide a model's tensors and its tokenizer, as `trained_with` names them.
ARCHITECTURE_FLAGS = ("model", "img_size", "patch_size", "vae_embed_dim", "vae_stride", "class_num", "buffer_size",
                      "diffloss_w", "tokenizer")


def trained_with(checkpoint: Mapping[str, Any]) -> str:
    """One line naming the architecture flags a checkpoint's run was trained with (its stored ``args``)."""
    stored = checkpoint.get("args") or {}
    flags = [f"--{name} {stored[name]}" for name in ARCHITECTURE_FLAGS if stored.get(name) is not None]
    if stored.get("mrar"):
        flags.append("--mrar")
    if not flags:
        return "the checkpoint stores no settings ('args') to say which model it is"
    return "the checkpoint was trained with " + " ".join(flags)


CLASS_EMBEDDING = "class_emb.weight"


def _mapped_class_rows(source: torch.Tensor, target: torch.Tensor,
                       class_rows: Mapping[int, int]) -> tuple[torch.Tensor, str]:
    """``target`` [K, D] with rows ``class_rows`` (model row -> checkpoint row) copied from ``source`` [K', D]."""
    for row, source_row in class_rows.items():
        if not (0 <= row < target.shape[0] and 0 <= source_row < source.shape[0]):
            raise ValueError(f"class map: class {row} -> pretrained class {source_row} is outside the model's "
                             f"{target.shape[0]} or the checkpoint's {source.shape[0]} classes")
    rows = target.clone()
    for row, source_row in class_rows.items():
        rows[row] = source[source_row]
    fresh = target.shape[0] - len(class_rows)
    copied = ", ".join(f"{row}<-{source_row}" for row, source_row in sorted(class_rows.items()))
    return rows, (f"{CLASS_EMBEDDING}: checkpoint {list(source.shape)} -> model {list(target.shape)}, "
                  f"{len(class_rows)} row(s) copied from pretrained classes ({copied or 'none'}), {fresh} "
                  "initialised as in training")


def _z_proj_input_changed(src_sd: Mapping[str, torch.Tensor], target_sd: Mapping[str, torch.Tensor]) -> bool:
    """True when ``z_proj.weight`` keeps its output width D but changes its input width."""
    source, target = src_sd.get("z_proj.weight"), target_sd.get("z_proj.weight")
    return (source is not None and target is not None and source.ndim == target.ndim == 2
            and source.shape[0] == target.shape[0] and source.shape[1] != target.shape[1])


def _same_batch_and_width(source: torch.Tensor, target: torch.Tensor) -> bool:
    return (source.ndim == target.ndim == 3 and source.shape[0] == target.shape[0] == 1
            and source.shape[2] == target.shape[2])


def _is_broadcastable_mask_token(key: str, source: torch.Tensor, target: torch.Tensor) -> bool:
    return key.split(".")[-1] == "mask_token" and _same_batch_and_width(source, target) and source.shape[1] == 1


def _is_resizable_pos_embed(key: str, source: torch.Tensor, target: torch.Tensor) -> bool:
    return ("pos_embed" in key and _same_batch_and_width(source, target)
            and _is_square(source.shape[1]) and _is_square(target.shape[1]))


def _is_square(n: int) -> bool:
    return math.isqrt(n) ** 2 == n


def _interpolate_pos_embed(source: torch.Tensor, new_len: int) -> torch.Tensor:
    """Bicubic resize of a [1, N, D] square-grid position embedding to [1, new_len, D]."""
    old_side, new_side = math.isqrt(source.shape[1]), math.isqrt(new_len)
    width = source.shape[2]
    grid = source.float().reshape(1, old_side, old_side, width).permute(0, 3, 1, 2)  # [1, D, n, n]
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)  # [1, D, m, m]
    return grid.permute(0, 2, 3, 1).reshape(1, new_len, width).to(source.dtype)  # [1, M, D]


def _width(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    for key in ("fake_latent", "encoder_norm.weight"):
        if key in state_dict:
            return int(state_dict[key].shape[-1])
    return None


def _block_count(state_dict: Mapping[str, torch.Tensor]) -> int:
    pattern = re.compile(r"^encoder_blocks\.(\d+)\.")
    return len({match.group(1) for key in state_dict if (match := pattern.match(key))})


def _mismatch_message(src_sd, target_sd, missing, unexpected, mismatched, model_for_width) -> str:
    """The one explanation of a checkpoint that does not fit the model built from the flags."""
    lines = ["checkpoint does not fit the model:"]
    src_width, target_width = _width(src_sd), _width(target_sd)
    if src_width is not None and target_width is not None and src_width != target_width:
        hint = (f"pass --model {model_for_width[src_width]}" if src_width in model_for_width
                else "did you pass the right --model?")
        lines.append(f"checkpoint width {src_width} but model width {target_width}: {hint}")
    src_blocks, target_blocks = _block_count(src_sd), _block_count(target_sd)
    if src_blocks != target_blocks:
        lines.append(f"checkpoint has {src_blocks} encoder blocks but the model has {target_blocks}: "
                     "did you pass the right --model?")
    src_classes, target_classes = src_sd.get("class_emb.weight"), target_sd.get("class_emb.weight")
    if src_classes is not None and target_classes is not None and src_classes.shape[0] != target_classes.shape[0]:
        lines.append(f"the checkpoint has {src_classes.shape[0]} classes but the model {target_classes.shape[0]}: "
                     f"pass --class_num {src_classes.shape[0]}")
    src_mask, target_mask = src_sd.get("mask_token"), target_sd.get("mask_token")
    if (src_mask is not None and target_mask is not None and src_mask.ndim == target_mask.ndim == 3
            and src_mask.shape[1] > 1 and target_mask.shape[1] == 1):
        lines.append(f"the checkpoint is an MRAR model (mask_token {list(src_mask.shape)}): add --mrar --patch_size 2")
    for title, items in (("shape mismatches", mismatched), ("missing in checkpoint", missing),
                         ("unexpected in checkpoint", unexpected)):
        if items:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            lines.append(f"{title} ({len(items)}): " + "; ".join(shown))
    return "\n".join(lines)
