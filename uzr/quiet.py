"""Third-party noise that uzr's entry points filter out, each rule by its exact message and origin.

:func:`quiet_third_party` is called once at the top of each entry point (``uzr.train``, ``uzr.live``), before
torch or lightning are imported. Only known, harmless messages are dropped, each matched by its text *and*
its category/module (warnings) or logger (log records): any other warning, including a new one from the
same library, still reaches the user. Noise with a source fix is fixed there instead (the W&B
``anonymous`` warning in :mod:`uzr.loggers`, setuptools' licence warning in ``pyproject.toml``).
"""

from __future__ import annotations

import logging
import sys
import warnings

# (message regex matched at the start of the text, category, module regex of the code that warns)
WARNING_RULES: tuple[tuple[str, type[Warning], str], ...] = (
    # torch >= 2.10 deprecates LeafSpec; lightning's _pytree (2.6.x) still builds one for every batch it
    # moves. Harmless until torch removes LeafSpec, when lightning must change anyway.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning,
     r"lightning\.pytorch\.utilities\._pytree\Z"),
)

# Lightning logs an advert for its cloud products ("💡 Tip: For seamless cloud logging ..." at every
# Trainer creation; "... cloud uploads and versioning" at the first checkpoint) through these loggers.
TIP_PREFIX = "💡 Tip: For seamless cloud"
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                     "lightning.fabric.utilities.seed")


class _LightningLogFilter(logging.Filter):
    """On lightning's own loggers: drops the cloud tips, and stops lightning's console handler from
    printing a second copy of what the root logger's handlers (Hydra's) print already."""

    def filter(self, record: logging.LogRecord) -> bool:
        _dedupe_lightning_console()  # lightning is imported by now: its handler exists
        return not record.getMessage().startswith(TIP_PREFIX)


class _PrintedByRoot(logging.Filter):
    """On ``lightning/__init__``'s console handler: passes a record only when no root handler will print it.

    Lightning attaches ``INFO: msg`` console handlers to its loggers and lets records propagate; once
    Hydra has configured the root logger, every lightning line came out twice (``INFO: GPU available`` and
    ``[time][lightning...][INFO] - GPU available``). Without root handlers (a plain script) nothing changes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (logging.getLogger("lightning").propagate and logging.getLogger().handlers)


_LOG_FILTER = _LightningLogFilter()
_ROOT_PRINTS = _PrintedByRoot()


def _dedupe_lightning_console() -> None:
    console = getattr(sys.modules.get("lightning"), "_console", None)
    if isinstance(console, logging.Handler):
        console.addFilter(_ROOT_PRINTS)  # a no-op when already there


def quiet_third_party() -> None:
    """Install the filters above (idempotent; cheap: imports nothing of torch or lightning)."""
    for message, category, module in WARNING_RULES:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name in LIGHTNING_LOGGERS:
        logging.getLogger(name).addFilter(_LOG_FILTER)
    _dedupe_lightning_console()
