"""Hooks on a model, owned in one place: model edits and captured layer inputs.

A :class:`ModelEdit` changes how a model computes (the attention :class:`~uzr.injection.injector.Injector`
today, a weight-space adapter next) and restores it exactly when removed. Use it as a context
manager so it is removed even when the forward pass fails::

    with injected(model, injector):   # injector=None: the plain model
        out = model(**batch)

:func:`capture_inputs` records the hidden state entering chosen modules (a forward pre-hook with
keyword arguments, which is how decoder layers call their attention), for as long as the block runs.
Attention recorders have their own block, :func:`uzr.attention.recording`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch


class ModelEdit(ABC):
    """Something attached to a model that changes its computation until removed.

    ``attach(model)`` returns the edit; ``remove()`` detaches everything it added and leaves the model
    computing exactly what it computed before (tested bit-for-bit for the injector).
    """

    @abstractmethod
    def attach(self, model) -> ModelEdit: ...

    @abstractmethod
    def remove(self) -> None: ...

    def __enter__(self) -> ModelEdit:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class Edits(ModelEdit):
    """Several edits as one: attached in order, removed in reverse order (``None`` entries are left out), e.g. an
    adapter's weights and an injector on the adapted model."""

    def __init__(self, *edits: ModelEdit | None):
        self.edits = [edit for edit in edits if edit is not None]
        self._attached: list[ModelEdit] = []

    def attach(self, model) -> Edits:
        try:
            for edit in self.edits:
                edit.attach(model)
                self._attached.append(edit)
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        while self._attached:
            self._attached.pop().remove()


@contextmanager
def injected(model, edit: ModelEdit | None) -> Iterator[Any]:
    """``model`` with ``edit`` attached for the block (``None``: unchanged); removed on exit, also on error."""
    if edit is None:
        yield model
        return
    edit.attach(model)
    try:
        yield model
    finally:
        edit.remove()


def layer_input(args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor:
    """The hidden state a module was called with: (B, q, D)."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


@contextmanager
def capture_inputs(modules: Mapping[int, torch.nn.Module], detach: bool = False) -> Iterator[dict[int, torch.Tensor]]:
    """``{key: hidden state (B, q, D)}`` entering each module, refreshed by every forward pass in the block."""
    captured: dict[int, torch.Tensor] = {}

    def hook_for(key: int):
        def hook(module, args, kwargs):
            hidden = layer_input(args, kwargs)
            captured[key] = hidden.detach() if detach else hidden

        return hook

    handles = [module.register_forward_pre_hook(hook_for(key), with_kwargs=True) for key, module in modules.items()]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
