"""Weight-space adapters: singular-value fine-tuning (SVF) experts, their training and few-shot mixing.

- :mod:`uzr.adapters.svd`: which weight matrices are adapted, their float32 SVD, cached by model hash.
- :mod:`uzr.adapters.svf`: :class:`~uzr.adapters.svf.SVFEdit` (a :class:`~uzr.hooks.ModelEdit` that
  materialises rescaled weights once per swap), the differentiable training edit, expert checkpoints.
- :mod:`uzr.adapters.cem`: the cross-entropy method used to mix experts on a few examples.
- :mod:`uzr.adapters.reinforce`: the REINFORCE LightningModule that trains one expert.
- :mod:`uzr.adapters.domains`: checkable domains (arithmetic, facts, causal loops) with their checkers.
"""
