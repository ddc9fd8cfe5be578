"""REINFORCE on a tiny model and a toy domain with a learnable reward raises the held-out reward."""

from __future__ import annotations

import random

import lightning as L
import torch
from torch.utils.data import DataLoader

from tests.conftest import model_spec
from uzr.adapters.reinforce import ReinforceModule, answer_logprobs, sample_answers
from uzr.adapters.svd import decompose, target_matrices
from uzr.adapters.svf import SVFEdit, SVFExpert
from uzr.models import load_model


def toy_setup():
    """A fresh tiny Llama whose MLPs dominate the residual stream (down_proj x 8, so singular-value scales
    can move its next-token distribution), prompts of random letters, and a target set of answers: the
    quarter of single-character tokens that a random SVF expert makes most likely (so the reward is
    reachable by some expert)."""
    model, tok = load_model(model_spec("student/tiny_llama"))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(8)
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij ") for _ in range(8)) for _ in range(60)]
    train, held = words[:40], words[40:]
    decomp = decompose(target_matrices(model, "mlp"))
    single = [i for i in range(len(tok)) if len(tok.decode([i])) == 1 and tok.decode([i]).strip()]
    g = torch.Generator().manual_seed(1)
    probe = SVFExpert({n: torch.randn(s.shape, generator=g) * 2 for n, s in decomp.S.items()})
    enc = tok(train, return_tensors="pt", padding=True)
    last = enc["attention_mask"].sum(1) - 1
    with torch.no_grad():
        p0 = model(**enc).logits[torch.arange(len(train)), last].softmax(-1).mean(0)
        with SVFEdit(decomp, probe.masks()).attach(model):
            p1 = model(**enc).logits[torch.arange(len(train)), last].softmax(-1).mean(0)
    order = torch.argsort((p1 - p0)[single], descending=True)[:len(single) // 4]
    target = {tok.decode([single[i]]) for i in order.tolist()}
    return model, tok, decomp, train, held, target


def expected_reward(model, tok, texts, target, edit=None) -> float:
    """Exact mean reward of a one-token answer, E[r] = 2 P(answer in target) - 1, from the next-token distribution."""
    ids = [i for i in range(len(tok)) if tok.decode([i]).strip() in target]
    total = 0.0
    for text in texts:
        with torch.no_grad():
            if edit is not None:
                edit.attach(model)
            try:
                p = model(**tok(text, return_tensors="pt")).logits[0, -1].softmax(-1)
            finally:
                if edit is not None:
                    edit.remove()
        total += 2 * float(p[ids].sum()) - 1
    return total / len(texts)


def test_reinforce_raises_the_heldout_reward_above_base():
    model, tok, decomp, train, held, target = toy_setup()
    base = expected_reward(model, tok, held, target)
    L.seed_everything(0, verbose=False)
    module = ReinforceModule(model, tok, decomp, train, [""] * len(train), lambda pred, ans: 1.0 if pred in target else -1.0,
                             lr=0.3, samples_per_prompt=8, max_new_tokens=1)
    loader = DataLoader(list(range(len(train))), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    L.Trainer(max_epochs=4, gradient_clip_val=1e-3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, deterministic=True).fit(module, loader)
    expert = expected_reward(model, tok, held, target, SVFEdit(decomp, module.edit.masks()))
    assert len(module.history) == 4 * 5
    # measured: base +0.085, expert +0.117 (exact expectations, no sampling noise in the evaluation)
    assert expert - base > 0.02, (base, expert)
    assert expected_reward(model, tok, held, target) == base  # the student itself never changed


def test_sampled_answers_and_their_logprobs_line_up(tiny_models):
    model, tok = tiny_models["llama"]
    torch.manual_seed(0)
    prompts, answers, decoded = sample_answers(model, tok, ["abc", "hello there"], samples=3, max_new_tokens=4)
    assert len(prompts) == len(answers) == len(decoded) == 6
    assert prompts[0] == prompts[2] == tok("abc")["input_ids"] and prompts[3] == tok("hello there")["input_ids"]
    assert all(1 <= len(a) <= 4 for a in answers)
    totals, dists = answer_logprobs(model, prompts, answers, tok.pad_token_id)
    for k in (0, 4):  # each summed log-probability equals the one from an unpadded forward pass
        ids = torch.tensor([prompts[k] + answers[k]])
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0].log_softmax(-1)
        n = len(prompts[k])
        want = sum(float(logp[n - 1 + t, answers[k][t]]) for t in range(len(answers[k])))
        assert abs(float(totals[k]) - want) < 1e-4 and dists[k].shape == (len(answers[k]), logp.shape[-1])
