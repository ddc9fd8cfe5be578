"""Head matching: which teacher head each student head learns from (``controller.target=per_head``, issue 13).

Per-head targets need a head-to-head map: a student's head ``h`` and the teacher's head ``h`` share nothing
but an index. Each injected layer is matched on the harvest's *training* texts (held-out texts never choose
the map they are scored with) by the mean row KL ``KL(teacher head i || student head j)`` over the stored
leading block, both on the student's token grid:

- equal head counts, or more teacher heads: Hungarian matching (``scipy.optimize.linear_sum_assignment``),
  one distinct teacher head per student head at the least total KL. A permuted copy of a model is matched
  back exactly;
- fewer teacher heads than student heads (e.g. Gemma 3 270M's 4 heads teaching SmolLM2-135M's 9): each
  student head takes the teacher head of least KL, many to one. A one-to-one map would leave student
  heads without a target; the nearest teacher head is the one the injected prior moves the head least far
  toward. MiniLMv2's relation heads were not chosen: they re-split queries and keys of both models into a
  common number of *relation* heads, which gives targets for a distillation loss but no distribution that
  injection can put into one of the student's own heads.

Student heads, not key/value groups, are the unit: ``mix`` replaces each query head's probabilities, the
heads of one group attend differently (their queries differ), and with one key/value head (Gemma 3 270M)
a per-group target would be the head mean again.

**Matching by output slot** (``harvest.head_matching=output``). Attention similarity answers "which teacher head
does this head resemble", not "which teacher head's job does this head do". When the student *is* the teacher with
its query heads permuted (``student.damage.kind=permute_heads``), the damaged head ``h`` attends like teacher head
``perm[h]`` but still writes into output slot ``h``: attention matching pairs it with ``perm[h]`` and the oracle hands
it the pattern it already has. ``output`` instead pairs heads whose value and output projections agree (the squared
distance between teacher head ``i``'s and student head ``j``'s ``o_proj`` column block plus their value heads' ``v_proj``
row blocks; Hungarian), so head ``h`` gets teacher head ``h``'s rows. It needs the same projection shapes on both
sides (a damaged copy, the positive control); for two different models there is no common weight space.

**Matching by measured effect** (``harvest.head_matching=effect``, :mod:`uzr.harvest.effect_matching`): the cost
of a pair is the change of the student's loss when that teacher head's rows replace the student head's alone; it
repairs the permuted copy too, and needs no common weight space.

The map and the cost matrix go into the store's ``layout.json`` (``head_matching``), so a run records them.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from uzr.attention import attention_modules

_FLOOR = 1e-8  # student probabilities stored in float16 underflow to 0 below ~6e-8


def head_kl(teacher: torch.Tensor, student: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed row KL of every (teacher head, student head) pair on one text, and the number of rows.

    Args:
        teacher: (H_t, D, D) aligned teacher rows; student: (H_s, D, D) student rows (causal, rows sum to ~1).
    Returns:
        ((H_t, H_s) float64 sum over rows of ``KL(t_i row || s_j row)``, rows counted). Rows are renormalised
        (float16 storage); a row that has no mass in some head is left out for every pair.
    """
    t = teacher.double().clamp_min(0)
    s = student.double().clamp_min(0)
    t_mass, s_mass = t.sum(-1), s.sum(-1)  # (H_t, D), (H_s, D)
    valid = (t_mass > 0).all(0) & (s_mass > 0).all(0)  # (D,)
    t = t[:, valid] / t_mass[:, valid, None]  # (H_t, R, D)
    s = s[:, valid] / s_mass[:, valid, None]  # (H_s, R, D)
    own = torch.special.xlogy(t, t).sum((-1, -2))  # (H_t,) sum_r sum_k t log t
    cross = torch.einsum("irk,jrk->ij", t, s.clamp_min(_FLOOR).log())  # (H_t, H_s)
    return own[:, None] - cross, int(valid.sum())


def match_heads(cost: np.ndarray, nearest: str = "min_kl_many_to_one") -> tuple[list[int], str]:
    """Teacher head for each student head from a (H_t, H_s) cost; returns (map, method name). ``nearest``: the
    method's name when the teacher has fewer heads (each student head its least-cost teacher head)."""
    cost = np.asarray(cost, dtype=np.float64)
    n_teacher, n_student = cost.shape
    if n_teacher >= n_student:
        rows, cols = linear_sum_assignment(cost)  # one distinct teacher head per student head
        teacher_of = [0] * n_student
        for t, s in zip(rows.tolist(), cols.tolist()):
            teacher_of[s] = t
        return teacher_of, "hungarian"
    return cost.argmin(0).tolist(), nearest


def match_store(rows, layers: list[int]) -> dict:
    """``layout.head_matching`` from a per-head store's training rows (:class:`~uzr.harvest.store.StoreRows`).

    Returns ``{"L{layer}": {"teacher_heads": [...], "cost": (H_t, H_s) mean KL per row, "method": ..., "rows": n}}``.
    """
    if len(rows) == 0:
        raise ValueError("head matching needs training texts in the harvest store (the train split is empty)")
    sums: dict[int, torch.Tensor] = {}
    counts = dict.fromkeys(layers, 0)
    for i in range(len(rows)):
        row = rows[i]
        for layer in layers:
            kl, n = head_kl(torch.from_numpy(np.asarray(row[f"teacher_heads_L{layer}"])),
                            torch.from_numpy(np.asarray(row[f"student_heads_L{layer}"])))
            sums[layer] = kl if layer not in sums else sums[layer] + kl
            counts[layer] += n
    out = {}
    for layer in layers:
        cost = (sums[layer] / max(counts[layer], 1)).numpy()
        teacher_of, method = match_heads(cost)
        out[f"L{layer}"] = {"teacher_heads": teacher_of, "method": method, "rows": counts[layer],
                            "cost": np.round(cost, 6).tolist()}
    return out


def output_cost(teacher_attn: torch.nn.Module, student_attn: torch.nn.Module, num_heads: int,
                num_kv_heads: int) -> np.ndarray:
    """(H_t, H_s) squared distance between the heads' output-side weights: ``o_proj`` column blocks (D, d) and the
    ``v_proj`` row blocks (d, D) of each head's value head."""
    def head_weights(attn) -> torch.Tensor:
        o = attn.o_proj.weight.detach().float()  # (D, H * d)
        v = attn.v_proj.weight.detach().float()  # (H_kv * d, D)
        d = o.shape[1] // num_heads
        o_heads = o.reshape(o.shape[0], num_heads, d).transpose(0, 1).reshape(num_heads, -1)  # (H, D * d)
        v_heads = v.reshape(num_kv_heads, -1).repeat_interleave(num_heads // num_kv_heads, 0)  # (H, d * D)
        return torch.cat([o_heads, v_heads], 1)  # (H, 2 * D * d)

    t, s = head_weights(teacher_attn), head_weights(student_attn)
    if t.shape[1] != s.shape[1]:
        raise ValueError("harvest.head_matching=output needs teacher and student attention of the same shapes "
                         f"(o_proj/v_proj per head: {t.shape[1]} vs {s.shape[1]} weights); use attention")
    return (torch.cdist(t.double(), s.double()) ** 2).numpy()


def match_outputs(teacher, student, layers: list[int], teacher_layers: list[int]) -> dict:
    """``layout.head_matching`` by output slot (module docstring): one distinct teacher head per student head."""
    t_mods, s_mods = attention_modules(teacher), attention_modules(student)
    config = student.config.get_text_config() if hasattr(student.config, "get_text_config") else student.config
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    out = {}
    for layer, t_layer in zip(layers, teacher_layers):
        cost = output_cost(t_mods[t_layer], s_mods[layer], heads, kv)
        rows, cols = linear_sum_assignment(cost)
        teacher_of = [0] * cost.shape[1]
        for t, h in zip(rows.tolist(), cols.tolist()):
            teacher_of[h] = t
        out[f"L{layer}"] = {"teacher_heads": teacher_of, "method": "output_slot", "cost": np.round(cost, 6).tolist()}
    return out


def teacher_heads_of(layout, layer: int) -> list[int]:
    """The teacher head each student head of ``layer`` learns from, as the store recorded it."""
    matching = layout.head_matching or {}
    if f"L{layer}" not in matching:
        raise ValueError(f"the harvest store has no head matching for layer {layer} (per_head={layout.per_head}); "
                         "per-head targets need a store harvested with controller.target=per_head")
    return list(matching[f"L{layer}"]["teacher_heads"])


def matched_teacher_rows(row: dict, layer: int, layout) -> np.ndarray:
    """(H_s, D, D) per-head targets of one store row: student head ``h`` gets its matched teacher head's rows."""
    return np.asarray(row[f"teacher_heads_L{layer}"])[teacher_heads_of(layout, layer)]
