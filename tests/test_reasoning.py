"""Halting (ACT and zero-shot exits), Hoyer sparsity and the latent reasoning unit."""

from __future__ import annotations

import pytest
import torch

from uzr.reasoning import LatentReasoningUnit, convergence_ratio, hoyer_sparsity, iterate, stability_loss


def _scripted(logits: torch.Tensor):
    """A halting unit whose logit at step n is logits[n - 1] (B, S) — independent of the state."""
    calls = []

    def halting(h):
        calls.append(None)
        return logits[len(calls) - 1]
    return halting


def _drift(h):
    return h + 1.0


def test_act_weights_sum_to_one_and_ponder_is_n_plus_r():
    torch.manual_seed(0)
    B, S, D, T = 3, 5, 4, 8
    logits = torch.randn(T, B, S) * 2
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[2, 3:] = False
    out = iterate(_drift, torch.zeros(B, S, D), max_steps=T, halting=_scripted(logits), mask=mask)
    p = torch.sigmoid(logits)
    for b in range(B):
        for s in range(S):
            if not mask[b, s]:
                assert out.weights[:, b, s].abs().sum() == 0 and out.steps[b, s] == 0
                continue
            cum, n_halt = 0.0, T  # step-by-step reference of Graves' rule
            for n in range(T):
                if cum + p[n, b, s] >= 0.99:
                    n_halt = n + 1
                    break
                cum += p[n, b, s]
            R = 1 - cum
            assert out.steps[b, s] == n_halt
            assert out.remainder[b, s] == pytest.approx(float(R), abs=1e-6)
            assert out.ponder[b, s] == pytest.approx(n_halt + float(R), abs=1e-6)
            w = out.weights[:, b, s]
            assert w.sum() == pytest.approx(1.0, abs=1e-6)
            assert torch.allclose(w[:n_halt - 1], p[:n_halt - 1, b, s])
            assert w[n_halt - 1] == pytest.approx(float(R), abs=1e-6) and (w[n_halt:] == 0).all()
            # state after n steps of +1 is n: the output is the weighted mean step count
            expect = sum((n + 1) * float(w[n]) for n in range(len(w)))
            assert out.output[b, s] == pytest.approx(torch.full((D,), expect), abs=1e-5)


def test_act_halts_early_when_confident_and_stops_the_loop():
    logits = torch.full((8, 1, 2), 5.0)  # p = 0.993 >= 0.99 at the first step
    out = iterate(_drift, torch.zeros(1, 2, 3), max_steps=8, halting=_scripted(logits))
    assert out.steps.tolist() == [[1, 1]] and out.weights.shape[0] == 1
    assert out.ponder[0, 0] == pytest.approx(2.0)  # N = 1, R = 1 - 0


def test_threshold_one_runs_exactly_max_steps_with_a_distribution():
    logits = torch.full((8, 2, 3), 3.0)  # p = 0.95: would halt at step 2 with threshold 0.99
    out = iterate(_drift, torch.zeros(2, 3, 4), max_steps=8, halting=_scripted(logits), threshold=1.0)
    assert (out.steps == 8).all() and out.weights.shape[0] == 8
    assert torch.allclose(out.weights.sum(0), torch.ones(2, 3))
    assert (out.weights >= 0).all()
    assert torch.allclose(out.ponder, 8 + out.remainder)
    early = iterate(_drift, torch.zeros(2, 3, 4), max_steps=8, halting=_scripted(logits))
    assert (early.steps == 2).all()


def test_ponder_gradient_reaches_the_halting_unit_only_through_the_remainder():
    T = 6
    logits = torch.tensor([-1.5, -1.0, -0.5, 3.0, 0.0, 0.0]).view(T, 1, 1).requires_grad_()
    out = iterate(_drift, torch.zeros(1, 1, 2), max_steps=T, halting=_scripted(logits))
    p = torch.sigmoid(logits.detach()).flatten()
    assert out.steps.item() == 4  # 0.18 + 0.27 + 0.38 < 0.99; step 4 adds 0.95
    out.ponder.sum().backward()
    grad = logits.grad.flatten()
    # rho = N + 1 - sum_{n<N} p_n: d rho / d logit_n = -p_n (1 - p_n) before N, 0 at N (N is discrete)
    assert torch.allclose(grad[:3], -(p[:3] * (1 - p[:3])), atol=1e-6)
    assert grad[3:].abs().max() == 0


def test_fixed_mode_outputs_the_last_state():
    out = iterate(_drift, torch.zeros(1, 2, 3), max_steps=5, mode="fixed")
    assert (out.steps == 5).all() and torch.allclose(out.output, torch.full((1, 2, 3), 5.0))
    assert torch.allclose(out.weights.sum(0), torch.ones(1, 2)) and torch.allclose(out.ponder, out.steps.float())


def test_latent_and_kl_exit_when_successive_states_stop_changing():
    def settle(h):  # halves the distance to 1: from 0, h_n = 1 - 2^-n
        return h + (1 - h) / 2
    h0 = torch.zeros(1, 2, 3)
    h0[0, 1] = 0.999  # already converged position
    out = iterate(settle, h0, max_steps=8, mode="latent", exit_tol=0.05)
    # relative change 2^-n / (1 - 2^-(n-1)): inf, 1/2, 1/6, 1/14, 1/30 -> first below 0.05 at n = 5
    assert out.steps[0, 1] == 1 and out.steps[0, 0] == 5
    assert torch.allclose(out.output[0, 0], torch.full((3,), 1 - 2 ** -5))
    assert torch.allclose(out.weights.sum(0), torch.ones(1, 2))
    readout = lambda h: torch.stack([h[..., 0], -h[..., 0]], -1) * 10  # noqa: E731
    kl = iterate(settle, torch.zeros(1, 1, 3), max_steps=8, mode="kl", exit_tol=1e-3, readout=readout)
    assert 1 < kl.steps.item() < 8
    with pytest.raises(ValueError, match="halting mode 'nope' is invalid; valid: act"):
        iterate(settle, h0, mode="nope")


def test_hoyer_sparsity_is_zero_for_uniform_and_one_for_one_hot():
    assert hoyer_sparsity(torch.full((7,), 0.3)).item() == pytest.approx(0.0, abs=1e-6)
    assert hoyer_sparsity(torch.tensor([0.0, -2.0, 0.0, 0.0])).item() == pytest.approx(1.0)
    # two equal entries of four: H = 2 -> (4 - 2) / 3
    assert hoyer_sparsity(torch.tensor([1.0, 0.0, -1.0, 0.0])).item() == pytest.approx(2 / 3)
    batch = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 5.0]])
    assert torch.allclose(hoyer_sparsity(batch), torch.tensor([0.0, 1.0]))


def test_stability_loss_and_convergence_ratio():
    def shrink(h):
        return h * 0.5 + 1  # residuals shrink geometrically
    out = iterate(shrink, torch.zeros(1, 2, 2), max_steps=4, mode="fixed")
    assert stability_loss(out).item() == 0.0
    assert convergence_ratio(out) == pytest.approx(0.5 ** 3)
    grow = iterate(lambda h: h * 2 + 1, torch.zeros(1, 1, 1), max_steps=3, mode="fixed")  # residuals 1, 2, 4
    assert stability_loss(grow).item() == pytest.approx(((2 - 1) + (4 - 2)) / 2 / 1)
    assert convergence_ratio(grow) == pytest.approx(4.0)


def test_lru_runs_with_act_and_its_losses_train_the_halting_unit():
    torch.manual_seed(0)
    lru = LatentReasoningUnit(8, max_steps=8)
    c = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 4] = False
    out = lru(c, mask)
    assert out.output.shape == (2, 5, 8) and (out.output[1, 4] == 0).all()
    # b = -2: p = 0.12 per step, so nobody reaches 0.99 before the 8th step
    assert (out.halted.steps[mask] == 8).all()
    assert set(out.aux) == {"stability", "sparsity", "ponder", "total"}
    assert out.aux["ponder"].item() == pytest.approx(8 + 1 - 7 * torch.sigmoid(torch.tensor(-2.0)).item(), abs=1e-5)
    out.aux["total"].backward()
    assert lru.halt.bias.grad is not None and lru.halt.bias.grad.item() < 0  # ponder pushes p up (stop sooner)
    # with a causal mix, position 0 must not depend on later positions
    c2 = c.clone()
    c2[:, 3:] += 1
    lru.mix.weight.data.normal_()
    a, b = lru(c, None).output, lru(c2, None).output
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6)


def test_stop_early_off_runs_every_step_without_changing_the_result():
    """Decoding with a cache needs every step's states; halting must read the same."""
    torch.manual_seed(0)
    logits = torch.randn(6, 2, 5) * 2
    h0 = torch.randn(2, 5, 3)
    early = iterate(_drift, h0, max_steps=6, halting=_scripted(logits), threshold=0.5)
    full = iterate(_drift, h0, max_steps=6, halting=_scripted(logits), threshold=0.5, stop_early=False)
    assert early.weights.shape[0] < 6 and full.weights.shape[0] == 6 and full.residuals.shape[0] == 6
    for name in ("output", "steps", "remainder", "ponder"):
        assert torch.equal(getattr(early, name), getattr(full, name))
    assert torch.equal(full.weights[:early.weights.shape[0]], early.weights) and not full.weights[early.weights.shape[0]:].any()
