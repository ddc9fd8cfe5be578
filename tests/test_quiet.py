"""uzr.quiet drops the known third-party noise and nothing else; the W&B logger no longer triggers wandb's
``anonymous`` warning."""

from __future__ import annotations

import logging
import warnings

from uzr.quiet import TIP_PREFIX, quiet_third_party

PYTREE = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()` instead."


def _warn_from(module: str, message: str, category: type[Warning]) -> None:
    warnings.warn_explicit(message, category, filename=module.replace(".", "/") + ".py", lineno=21, module=module)


def test_new_warnings_get_through_known_noise_does_not():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        quiet_third_party()  # idempotent
        warnings.warn("x", UserWarning, stacklevel=1)  # a genuinely new warning
        _warn_from("lightning.pytorch.utilities._pytree", PYTREE, FutureWarning)  # the known noise
        # Same text from elsewhere, or another warning from the same module: not ours to hide.
        _warn_from("somewhere.else", PYTREE, FutureWarning)
        _warn_from("lightning.pytorch.utilities._pytree", "something new", FutureWarning)
        _warn_from("lightning.pytorch.utilities._pytree", PYTREE, UserWarning)
    got = [(str(w.message)[:14], w.category.__name__) for w in caught]
    assert got == [("x", "UserWarning"), (PYTREE[:14], "FutureWarning"), ("something new", "FutureWarning"),
                   (PYTREE[:14], "UserWarning")]


def test_the_real_lightning_pytree_warning_is_dropped():
    from lightning.pytorch.utilities._pytree import _tree_flatten

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        _tree_flatten({"a": 1})  # builds a LeafSpec in lightning's module
        warnings.warn("still here", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["still here"]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_lightning_cloud_tips_dropped_other_lightning_lines_kept():
    quiet_third_party()
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    records = _Records()
    log.addHandler(records)
    try:
        log.warning(TIP_PREFIX + " logging and experiment tracking, try installing [litlogger](...)")
        log.warning("GPU available: False, used: False")
        log.warning("Tip: something else")
    finally:
        log.removeHandler(records)
    assert records.messages == ["GPU available: False, used: False", "Tip: something else"]


def test_lightning_console_steps_aside_only_while_the_root_logger_prints():
    import lightning

    quiet_third_party()
    record = logging.LogRecord("lightning.pytorch", logging.INFO, __file__, 1, "GPU available", None, None)
    root, saved = logging.getLogger(), logging.getLogger().handlers[:]
    try:
        root.handlers = []
        assert lightning._console.filter(record)  # a plain script: lightning prints its own lines
        root.handlers = [logging.NullHandler()]
        assert not lightning._console.filter(record)  # Hydra's handlers print them: no second copy
    finally:
        root.handlers = saved


def test_wandb_logger_does_not_pass_anonymous(tmp_path):
    from types import SimpleNamespace

    from uzr.loggers import make_loggers

    spec = SimpleNamespace(csv=False, wandb=True, wandb_mode="offline", project="p", group=None)
    (logger,) = make_loggers(spec, tmp_path, "run", {"a": 1})
    assert "anonymous" not in logger._wandb_init and logger._wandb_init["project"] == "p"
