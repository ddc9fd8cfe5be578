"""Attention dominance (MDI / AEI, DESIGN.md §9): which of two key groups a model's attention favours.

- :mod:`uzr.dominance.indices`: the definitions (MDI, AEI_T, AEI_O, A_T) from group masses, stage layer
  sets, bootstrap intervals (plain and paired) and the MDI = AEI_T / AEI_O consistency check (numpy only);
- :mod:`uzr.dominance.groups`: token groups from character spans (offsets) and image-token ids;
- :mod:`uzr.dominance.measure`: greedy answer + one recorded forward with the
  :class:`~uzr.dominance.measure.GroupMass` reducer -> group masses per layer;
- :mod:`uzr.dominance.samples`: the text prompts (instruction vs passage, prompt vs answer) and the
  vision-language samples (MMMU-Pro ``vision``, or synthetic images offline);
- :mod:`uzr.dominance.stage`: the ``dominance`` stage (tables, figure, metrics).
"""
