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


def model_spec(name: str):
    from uzr.models import ModelSpec

    node = OmegaConf.merge(OmegaConf.structured(ModelSpec), OmegaConf.load(CONF / f"{name}.yaml"))
    return OmegaConf.to_object(node)


@pytest.fixture(scope="session")
def tiny_models():
    """{family: (model, tokenizer)} for the three architecture families in the configs."""
    from uzr.models import load_model

    return {family: load_model(model_spec(name)) for family, name in TINY.items()}
