"""Placement: stages with a `gpu=True` map go to a GPU worker when the machine has one."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import shutil
import subprocess

from serveflow.logical.operators import Map
from serveflow.optimizer.plan import Plan


@functools.cache
def gpu_available() -> bool:
    """True when torch sees a CUDA device, or, without torch, `nvidia-smi` lists one."""
    if importlib.util.find_spec("torch") is not None:
        import torch

        return bool(torch.cuda.is_available())
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def place(plan: Plan, gpus: bool | None = None) -> Plan:
    """Mark stages with a `gpu=True` map for a GPU worker when `gpus` (None: this
    machine has a GPU; a runtime passes whether it has GPU workers)."""
    has_gpu = gpu_available() if gpus is None else gpus
    stages = []
    for stage in plan.stages:
        wants_gpu = any(isinstance(op, Map) and op.gpu for op in stage.ops)
        placement = "gpu" if wants_gpu and has_gpu else "cpu"
        stages.append(dataclasses.replace(stage, gpu_requested=wants_gpu, placement=placement))
    return dataclasses.replace(plan, stages=tuple(stages))
