"""The environment a run ran in: its machine and the versions of the packages its numbers depend on.

Recorded in every run's ``job.json`` and W&B config, so a result can be traced to the environment that
produced it (a new transformers release once changed what injection computed; see requirements.lock).
"""

from __future__ import annotations

import os
import platform
from importlib import metadata

# The distributions whose behaviour a uzr number depends on, by their names on PyPI.
TRACKED = ("torch", "transformers", "lightning", "hydra-core", "datasets", "wandb", "numpy", "safetensors")


def package_versions() -> dict[str, str | None]:
    """``{distribution: version}`` of :data:`TRACKED` plus ``python``; None for one not installed."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in TRACKED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_info() -> dict:
    """Where a run ran: recorded per job so a sweep's report can name its machine."""
    import torch

    info = {
        "platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    return info
