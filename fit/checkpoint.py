"""Checkpoints of a fit that can be killed and resumed (tuned lenses, causal bases).

A checkpoint is ``OUT/checkpoint/`` holding ``state.safetensors`` (tensors) and ``state.json``
(step, settings, anything JSON-able); never pickle. It is written into ``checkpoint.tmp`` and
swapped in by renames only when complete, so a kill leaves the old checkpoint or the new one
(``checkpoint.old`` for the instant between the two renames).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lenscache.errors import LensError

CHECKPOINT_DIR = "checkpoint"


def save_checkpoint(out: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Write `tensors` and `state` as the checkpoint in `out`, replacing the previous one atomically."""
    ckpt, tmp, old = out / CHECKPOINT_DIR, out / (CHECKPOINT_DIR + ".tmp"), out / (CHECKPOINT_DIR + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    shutil.rmtree(old, ignore_errors=True)
    if ckpt.exists():
        os.replace(ckpt, old)
    os.replace(tmp, ckpt)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(tensors, state) of the checkpoint in `out`, or None when there is none."""
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):  # .old: killed between the two renames
        ckpt = out / name
        if (ckpt / "state.json").is_file() and (ckpt / "state.safetensors").is_file():
            try:
                return load_file(str(ckpt / "state.safetensors")), json.loads((ckpt / "state.json").read_text())
            except Exception as exc:
                raise LensError(f"resume (--resume): the checkpoint in {ckpt} cannot be read ({exc})") from exc
    return None


def remove_checkpoint(out: Path) -> None:
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
