"""How a run injects, set up in one place: its controllers (or another prior), then its sinks, then injectors.

Every caller that injects (the evaluate stage and its held-out texts, the gate table, the dominance stage,
the SVF comparison's injection row, the live demo) builds its injectors from one :class:`Injection`, so they
inject alike; their differences are the arguments of :meth:`Injection.injector`. A run's injection (its controllers,
sinks and ``inject.heads``, profiled for ``auto``) is :func:`uzr.evaluate.injection.run_injection`::

    injection = run_injection(run)                  # controllers, then sinks, then heads (once per run)
    with injected(model, injection.injector(prompt_len=None)):
        model.generate(...)
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from uzr.config.inject import AlphaSpec
from uzr.injection.injector import Injector
from uzr.injection.priors import AttentionPrior
from uzr.injection.sinks import SinkSet, run_sinks

Source = Mapping[int, torch.nn.Module] | AttentionPrior  # {layer: controller}, or any prior over keys


@dataclass(frozen=True)
class Injection:
    """What a run injects and how: ``source`` (``{layer: controller}`` or a prior), the ``alpha`` schedule, the
    ``mode`` (``bias`` or ``mix``), the kept sink keys (``inject.sinks=keep``: ``{layer: SinkSet}``; None:
    ``replace``) and the injected heads (``inject.heads``: ``{layer: heads}``; None: every head). One per run;
    :meth:`injector` makes the fresh injector each sequence needs."""

    source: Source
    alpha: AlphaSpec
    mode: str
    sinks: Mapping[int, SinkSet] | None = None
    heads: Mapping[int, tuple[int, ...]] | None = None

    def injector(self, *, prompt_len: int | None, gate: torch.Tensor | None = None, alpha: AlphaSpec | None = None,
                 source: Source | None = None) -> Injector:
        """A fresh :class:`Injector` of this injection.

        Args:
            prompt_len: decoding steps count from here: ``None`` from each prefill (generation), ``0`` for a whole
                text scored as generated (bits per byte, facts QA), the prompt's length for a recorded answer.
            gate: (B, 1) or (B, q) gate output, read by schedule ``gated``.
            alpha: another schedule than the run's (the gate table's variants, the live demo's gated one).
            source: another prior than the run's (the oracle and the controls of ``inject.source``).
        """
        return Injector(self.source if source is None else source, self.alpha if alpha is None else alpha,
                        self.mode, prompt_len=prompt_len, gate=gate, sinks=self.sinks, heads=self.heads)


def configured_injection(cfg, store, controllers: Mapping[int, torch.nn.Module],
                         memo: Callable[[Hashable, Callable[[], Any]], Any],
                         heads: Mapping[int, tuple[int, ...]] | None = None) -> Injection:
    """The config's injection of ``controllers``: ``alpha.*``, ``inject.mode`` and ``inject.sinks`` (sinks detected
    on ``store``'s training texts once per ``memo``, :func:`~uzr.injection.sinks.run_sinks`), on ``heads`` (the run's
    ``inject.heads`` resolved; None: every head)."""
    return Injection(controllers, cfg.alpha, cfg.inject.mode, run_sinks(cfg, store, memo), heads)
