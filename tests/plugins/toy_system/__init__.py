"""A toy fifth system, plugged into uzr only through its public registration points (tests/test_systems.py).

It is what a system outside the repository provides: this torch-free module, named by an entry point of group
``uzr.systems``, exports its config group (``CONFIG_GROUPS``: spec, validation, an option registered in code) and
its stage line (``STAGES``), whose need of the controller depends on ``toy.inject``; the stage's implementation
(``toy_system.stage``) is imported only when it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from uzr.config.checks import check_bool, check_int
from uzr.config.groups import ConfigGroup
from uzr.stages import StageInfo


@dataclass
class ToySpec:
    layers: int = 1  # leading student layers whose parameters the stage counts
    inject: bool = False  # also report the controller's layers: the stage then needs the controller


def validate_toy(cfg) -> None:
    check_int("toy.layers", cfg.toy.layers, minimum=1, maximum=cfg.student.num_layers)
    check_bool("toy.inject", cfg.toy.inject)


def toy_needs(cfg) -> dict[str, str]:
    """The controller, only with ``toy.inject=true``."""
    return {"controller": "toy.inject=true reports the controller's layers"} if cfg.toy and cfg.toy.inject else {}


CONFIG_GROUPS = (ConfigGroup("toy", ToySpec, validate_toy, options={"default": ToySpec()}),)
STAGES = (
    StageInfo("toy", (), ("toy", "student"), 1, "toy_system.stage:ToyStage", needs_when="toy_system:toy_needs",
              summary="parameters of the student's leading layers (and the controller's layers with toy.inject)"),
)
