"""controller=lru: the bilinear controller with an LRU + ACT refining its features trains, adds the
auxiliary losses and reports mean iterations and their correlation with teacher attention entropy."""

from __future__ import annotations

import math

import pytest
import torch

from uzr.controller import ControllerModule, ControllerSpec, build_controller, coerce_spec, controller_loss
from uzr.controller.loss import auxiliary_loss

from .test_controller import _DM, _synthetic, _trainer, one_thread  # noqa: F401  (fixture)


def test_lru_spec_validation_names_the_field():
    with pytest.raises(ValueError, match=r"controller.lru_halting='sometimes' is invalid; valid: act \| fixed"):
        coerce_spec({"arch": "lru", "lru_halting": "sometimes"})
    with pytest.raises(ValueError, match=r"controller.lru_threshold=1.5 is invalid; valid: a number in \(0, 1\]"):
        coerce_spec({"arch": "lru", "lru_threshold": 1.5})
    with pytest.raises(ValueError, match=r"controller.lru_max_steps=0"):
        coerce_spec({"arch": "lru", "lru_max_steps": 0})
    with pytest.raises(ValueError, match=r"controller.ponder_weight=-1"):
        coerce_spec({"arch": "lru", "ponder_weight": -1})


def test_loss_adds_the_weighted_auxiliary_losses():
    torch.manual_seed(0)
    spec = ControllerSpec(arch="lru", key_dim=8, mlp_hidden=16)
    ctrl = build_controller(spec, 16)
    h, mask = torch.randn(2, 6, 16), torch.ones(2, 6, dtype=torch.bool)
    module = ControllerModule(16, [0], spec)
    module.controllers["0"] = ctrl
    target = torch.softmax(torch.randn(2, 6, 6), -1).tril()
    total, outs, _ = module._layer_losses({"mask": mask, "hidden": {"0": h}, "target": {"0": target}})
    a = ctrl.last_aux
    want = controller_loss(ctrl(h, mask), target, mask, spec)["loss"] + \
        0.1 * a["stability"] + 0.01 * a["sparsity"] + 0.001 * a["ponder"]
    assert float(auxiliary_loss(a, spec).detach()) == pytest.approx(
        float((0.1 * a["stability"] + 0.01 * a["sparsity"] + 0.001 * a["ponder"]).detach()))
    assert float(total.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    assert outs["0"]["steps"].shape == (2, 6) and (outs["0"]["steps"] == 8).all()  # b = -2: 8 steps at first


@pytest.mark.usefixtures("one_thread")
def test_lru_controller_trains_and_reports_iterations():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    S, D = 16, 32
    train, val = _synthetic(128, S, D, gen, layers=("1",)), _synthetic(48, S, D, gen, layers=("1",))
    spec = ControllerSpec(arch="lru", key_dim=16, mlp_hidden=32, lr=1e-2, weight_decay=0.0, batch_size=16,
                          max_epochs=6, lru_max_steps=4)
    module = ControllerModule(hidden_size=D, layers=[1], spec=spec)
    _trainer(spec.max_epochs).fit(module, datamodule=_DM(train, val, spec.batch_size))
    rep = module.heldout_report()
    assert rep["val/kl/controller"] < 0.5 * rep["val/kl/uniform"], rep
    assert 1 <= rep["val/lru/mean_iterations"] <= 4
    assert math.isfinite(rep.get("val/lru/iterations_entropy_corr", 0.0))
