"""``svf.objective=distill``: an SVF expert (or a baseline adapter) trained toward the teacher's next-token
distribution on a domain's training prompts, as a LightningModule.

The teacher answers every training prompt greedily (once, with the shared tokenizer: the pair must share one
vocabulary, checked by :func:`uzr.config.svf.validate_distill` before loading and again on the loaded
tokenizers); a step minimises the mean over the answer tokens of ``KL(teacher || student with the edit)`` of
the next-token distributions at those positions (forward KL: the student covers the teacher's mass). Adam at
``svf.lr`` on the edit's parameters only; the Trainer clips the gradient norm at ``svf.clip`` (as for
REINFORCE). The answers are deterministic, so a resumed run recomputes the same targets.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import lightning as L
import torch
from torch import Tensor, nn

from uzr.adapters.reinforce import answer_logprobs, sample_answers
from uzr.adapters.svd import Decomposition
from uzr.adapters.svf import SVFTrainable, initial_z

log = logging.getLogger(__name__)


def check_same_vocabulary(teacher_tok, student_tok) -> None:
    """Distillation compares distributions token for token: refuse two different vocabularies."""
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise ValueError("svf.objective='distill' needs the teacher and the student to share one vocabulary; these "
                         "tokenizers differ: use a teacher with the student's tokenizer, or svf.objective=reinforce")


def kl_to_teacher(teacher_logp: Sequence[Tensor], student_logp: Sequence[Tensor]) -> Tensor:
    """Mean over all answer tokens of ``KL(teacher || student)``; each entry an (n_i, V) log-softmax."""
    total = sum(torch.sum(t.exp() * (t - s)) for t, s in zip(teacher_logp, student_logp))
    return total / sum(len(t) for t in teacher_logp)


class DistillModule(L.LightningModule):
    """Trains the ``z`` of one expert (or a trainable ``edit``) toward the teacher; student and teacher stay
    frozen and unregistered (a checkpoint holds the edit and the optimiser state). Batches are item indices."""

    def __init__(self, model, teacher, tokenizer, decomp: Decomposition | None, texts: Sequence[str],
                 lr: float = 2e-3, max_new_tokens: int = 24, init_z: float = 0.1, add_special_tokens: bool = True,
                 edit: nn.Module | None = None):
        super().__init__()
        self.edit = edit if edit is not None else SVFTrainable(decomp, initial_z(decomp, init_z))
        object.__setattr__(self, "lm", model)  # not submodules
        object.__setattr__(self, "teacher", teacher)
        object.__setattr__(self, "tokenizer", tokenizer)
        self.texts, self.lr, self.max_new_tokens, self.add_special = list(texts), lr, max_new_tokens, add_special_tokens
        self._targets: dict[int, tuple[list[int], list[int]]] = {}  # item -> (prompt ids, teacher's answer ids)
        self.history: list[dict[str, float]] = []  # per step: KL to the teacher before the update

    def configure_optimizers(self):
        return torch.optim.Adam(self.edit.parameters(), lr=self.lr)

    def targets(self, items: Sequence[int]) -> tuple[list[list[int]], list[list[int]]]:
        """The teacher's greedy answers to these items (computed once per item)."""
        todo = [i for i in items if i not in self._targets]
        if todo:
            self.teacher.eval()
            prompts, answers, _ = sample_answers(self.teacher, self.tokenizer, [self.texts[i] for i in todo], 1,
                                                 self.max_new_tokens, add_special_tokens=self.add_special, greedy=True)
            self._targets.update(zip(todo, zip(prompts, answers)))
        return [self._targets[i][0] for i in items], [self._targets[i][1] for i in items]

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        prompts, answers = self.targets([int(i) for i in batch])
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.lm.eval()
        with torch.no_grad():
            _, teacher_logp = answer_logprobs(self.teacher, prompts, answers, pad)
        with self.edit.attach(self.lm):
            _, student_logp = answer_logprobs(self.lm, prompts, answers, pad)
        loss = kl_to_teacher(teacher_logp, student_logp)
        self.history.append({"kl": float(loss.detach())})
        log.info("distill step %d: KL to the teacher %.4f", len(self.history), float(loss.detach()))
        self.log("train/kl", loss.detach(), prog_bar=True, batch_size=len(batch))
        return loss

    def z(self) -> dict[str, Tensor]:
        return self.edit.z_dict()
