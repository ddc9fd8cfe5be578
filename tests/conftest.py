"""Shared fixtures: tiny random models built from the project's own configs (no download)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TINY = {"llama": "student/tiny_llama", "qwen2": "student/tiny_qwen2", "gemma3": "teacher/tiny_gemma3"}


def composed(*overrides: str):
    """The Hydra config of ``train.yaml`` with ``overrides``, composed as a run would."""
    from hydra import compose, initialize_config_dir

    from uzr.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=False)


def resolved(*overrides: str):
    """The validated RunConfig of ``overrides`` (raises what a run would raise)."""
    from uzr.config import resolve_config

    cfg = composed(*overrides)
    return resolve_config(cfg)


def refusal_before_loading(monkeypatch, *overrides: str) -> str:
    """The ValueError message ``overrides`` are refused with, checked to come before any model loads."""
    import uzr.models  # as the fixtures: uzr is imported when a test needs it

    monkeypatch.setattr(uzr.models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError) as err:
        resolved(*overrides)
    return str(err.value)


def offline_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a ``python -m uzr.*`` subprocess: offline, its own ``HOME``, nothing else of this shell's
    but the thread counts. Those must travel: without them each run starts one torch thread per core beside the
    other pytest-xdist workers, and the waiting threads of oversubscribed OpenMP pools cost more than they
    compute (measured: a real-pair run took 3-4x its one-thread CPU time)."""
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline",
           "WANDB_SILENT": "true", "PATH": "/usr/bin:/bin", "HOME": str(home)}
    env.update({var: os.environ[var] for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if var in os.environ})
    return {**env, **extra}


def model_spec(name: str):
    from uzr.models import ModelSpec

    node = OmegaConf.merge(OmegaConf.structured(ModelSpec), OmegaConf.load(CONF / f"{name}.yaml"))
    return OmegaConf.to_object(node)


@pytest.fixture(scope="session")
def tiny_models():
    """{family: (model, tokenizer)} for the three architecture families in the configs."""
    from uzr.models import load_model

    return {family: load_model(model_spec(name)) for family, name in TINY.items()}


def pytest_configure(config):
    """Under pytest-xdist, split the cores between the workers: torch's default of one intra-op thread per core
    in every worker (and in the runs they start) leaves threads waiting for each other on a small machine."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = str(max(1, (os.cpu_count() or 1) // int(workers)))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = threads  # inherited by the `python -m uzr.train` subprocesses
        import torch

        torch.set_num_threads(int(threads))


@pytest.fixture(scope="session")
def converted_models(tmp_path_factory) -> Path:
    """One folder of converted packaged models (GGUF de-quantised once, tens of seconds per model) for the whole
    test session: ``$UZR_TEST_MODELS`` when set (e.g. ``.cache/uzr/models`` of earlier runs), else a temporary
    folder shared by all pytest-xdist workers of the session (the model cache's file locks make one worker
    convert while the others wait). Tests that run packaged models point their cache's ``models`` here
    (:func:`share_models`)."""
    given = os.environ.get("UZR_TEST_MODELS")
    if given:
        return Path(given)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = tmp_path_factory.getbasetemp().parent / "converted-models"
        shared.mkdir(exist_ok=True)
        return shared
    return tmp_path_factory.mktemp("converted-models")


def share_models(cache_dir: Path, models: Path) -> Path:
    """Make ``cache_dir/models`` the session's converted models (artifacts stay per test); returns ``cache_dir``."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    link = cache_dir / "models"
    if not link.exists():
        link.symlink_to(models, target_is_directory=True)
    return cache_dir


@pytest.fixture(scope="session")
def packaged_pair(converted_models, tmp_path_factory):
    """{"teacher": (Gemma 3 270M, tokenizer), "student": (SmolLM2-135M, tokenizer)}, loaded once per session from
    the shared converted models; skips when the packages are not installed."""
    import importlib.util

    from uzr.models import load_model

    specs = {"teacher": model_spec("teacher/gemma3_270m"), "student": model_spec("student/smollm2_135m")}
    missing = [s.gguf_package for s in specs.values() if importlib.util.find_spec(s.gguf_package) is None]
    if missing:
        pytest.skip(f"packaged models not installed: {missing}")
    cache = share_models(tmp_path_factory.mktemp("packaged-cache"), converted_models)
    return {role: load_model(spec, cache_dir=cache, role=role) for role, spec in specs.items()}
