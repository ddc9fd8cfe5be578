"""The run configuration: one schema over the registered config groups, validated up front.

``resolve_config(cfg)`` merges the composed Hydra config into :class:`RunConfig` (a typo'd key or a
wrongly typed value fails here, naming the key), then validates only what the planned stages read
(:mod:`uzr.stages`): each group through its descriptor's ``validate(cfg)`` (:mod:`uzr.config.groups`),
which checks its ranges and choices and what it needs from the other groups (layer indices against the
student's declared depth, the teacher-layer mapping against the teacher's) — all before any model is
loaded. ``RunConfig`` has one field per group of :func:`uzr.config.systems.config_groups` (built-in and
plugged-in systems alike) and the run's own top-level keys. Every default lives in the groups'
dataclasses; the YAML files under ``conf/`` hold only what differs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field, make_dataclass
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from uzr.config.platform import resolve_cache_dir
from uzr.config.systems import config_groups
from uzr.stages import StageInfo, conditional_needs, groups_of, plan, registry

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def default_stages() -> list[str]:
    """``stages`` when a config names none: the registered stages marked ``default`` (the transfer system's)."""
    return [name for name, info in registry().items() if info.default]


def _group_field(group) -> tuple:
    if group.always:
        return group.name, group.spec, field(default_factory=group.spec)
    return group.name, Optional[group.spec], field(default=None)  # noqa: UP045 (OmegaConf reads typing.Optional)


def _run_config_class() -> type:
    top_level = [
        ("stages", list[str], field(default_factory=default_stages)),
        ("name", str, field(default="run")),
        ("seed", int, field(default=0)),
        ("device", str, field(default="cpu")),
        # torch intra-op threads for the run (null: torch's default, one per core). On a CPU machine shared with
        # other jobs, 1 avoids threads waiting for each other: the smoke run took 35 s with 1 and 107 s with 2
        # on the 2-core machine at load average ~6 (README, Performance).
        ("threads", Optional[int], field(default=None)),  # noqa: UP045
    ]
    cls = make_dataclass("RunConfig", [*map(_group_field, config_groups()), *top_level], namespace={
        "__doc__": "One run: a field per config group (None: not selected; groups a run's stages do not read may "
                   "be absent) and the run's own keys.",
        "cache_dir": property(lambda self: resolve_cache_dir(self.paths.cache_dir),
                              doc="The artifact cache folder (``paths.cache_dir``, ``$UZR_CACHE`` or ``./.cache/uzr``)."),
    })
    cls.__module__ = __name__  # where pickling (sweeps) and readers find it
    return cls


RunConfig = _run_config_class()


def register_configs() -> None:
    """Register the schema as ``run_schema`` (the first default of ``conf/train.yaml``), so a composed
    config carries every default and a typo'd key fails at composition; and every group's options that a
    system ships in code (``ConfigGroup.options``) beside the YAML files of ``conf/``."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    for group in config_groups():
        for option, node in group.options.items():
            store.store(group=group.name, name=option, node=node)


def resolve_config(cfg: DictConfig) -> RunConfig:
    """Merge a composed Hydra config into the schema and validate it; raises ValueError on bad input."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), plain)
        run: RunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ValueError(f"invalid config: {err.msg.splitlines()[0]} (key: {getattr(err, 'full_key', '?')})") from None
    validate(run)
    return run


def group_options(group: str) -> list[str]:
    """The options of a config group: ``conf/<group>/*.yaml`` and those registered in code (for error messages)."""
    in_code = next((list(g.options) for g in config_groups() if g.name == group), [])
    return sorted({p.stem for p in (CONF_DIR / group).glob("*.yaml")} | set(in_code))


def validate(cfg: RunConfig) -> None:
    """Validate the groups the planned stages read (each through its descriptor), and the run's own keys."""
    planned = plan(cfg.stages, cfg)  # an unknown stage fails here, naming the valid ones
    required, optional = groups_of(planned)
    for group in sorted(required):
        if getattr(cfg, group) is None:
            raise ValueError(missing_group(group, planned, cfg))
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError(f"threads={cfg.threads} must be >= 1 (torch intra-op threads), or null for torch's default")
    read = required | {g for g in optional if getattr(cfg, g) is not None}
    # what the validators see: the config as the planned stages read it (a group none of them reads is None)
    view = dataclasses.replace(cfg, **{g.name: None for g in config_groups() if not g.always and g.name not in read})
    read_by_some_stage = {g for info in registry().values() for g in (*info.reads, *info.optional)}
    for group in config_groups():
        if group.name in read or group.name not in read_by_some_stage:  # the run's own groups: every run
            group.check(view)


def missing_group(group: str, planned: list[StageInfo], cfg: RunConfig) -> str:
    """The error of a group the planned stages read but the config lacks: who reads it, the options, and why
    a stage is planned when only a setting brought it in (:func:`uzr.stages.conditional_needs`)."""
    readers = [info.name for info in planned if group in info.reads]
    options = ", ".join(group_options(group)) or "see conf/"
    why = conditional_needs(planned, cfg)
    reasons = "".join(f" ({reason})" for name in readers for reason in why.get(name, []))
    return (f"stages {readers or cfg.stages} read the '{group}' config group, which this config lacks; add "
            f"{group}=<option> (options: {options}) or drop those stages{reasons}")
