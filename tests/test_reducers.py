"""A reducer defined here, outside uzr, plugs into the blocked attention pass without touching the kernel."""

from __future__ import annotations

import pytest
import torch

from uzr.attention import LayerRecorder, attention_modules, use_uzr_attention
from uzr.attention.reducers import HabitStats, HeadMeanRows, ScoreBlock

TEXTS = ["short text", "a much longer text, so that the other one is left padded by several tokens"]


class GroupMass:
    """Attention mass per token group, head-averaged: result (B, q, G), rows sum to 1 over the groups.

    ``groups``: (k,) group index of every key position. One matmul per block of the unnormalised
    probabilities with the one-hot (w, G) rows of the block's keys, then ``* 1/Z`` and the head mean.
    """

    name = "group_mass"
    query_dim = 1

    def __init__(self, groups: torch.Tensor):
        self.onehot = torch.nn.functional.one_hot(groups).float()  # (k, G)

    def start(self, batch: int, heads: int, q_len: int, k_len: int, device) -> None:
        assert k_len == q_len == self.onehot.shape[0]  # one forward pass without a cache
        self.out = torch.zeros(batch, q_len, self.onehot.shape[1], device=device)  # (B, q, G)

    def add(self, block: ScoreBlock) -> None:
        mass = block.e @ self.onehot[block.lo:block.hi]  # (B, H, n, G)
        self.out[:, block.start:block.stop] = (mass * block.inv_z[..., None]).mean(1)

    def finish(self) -> torch.Tensor:
        return self.out


def groups_for(s: int, n_groups: int = 5) -> torch.Tensor:
    return torch.randint(0, n_groups, (s,), generator=torch.Generator().manual_seed(s)).index_fill_(0, torch.tensor([0]), n_groups - 1)


@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_toy_reducer_equals_eager_attention_weights(tiny_models, family, padding):
    model, tok = tiny_models[family]
    tok.padding_side = "left"
    enc = tok(TEXTS if padding else TEXTS[1:], return_tensors="pt", padding=True)
    real = enc["attention_mask"].bool()  # (B, S)
    s = real.shape[1]
    assert (~real).any() == padding
    groups = groups_for(s)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(**enc, output_attentions=True)
    use_uzr_attention(model)
    modules = attention_modules(model)
    block_size = 3
    assert block_size < s  # several blocks per layer
    for module in modules:
        module.uzr_recorder = LayerRecorder(block_size=block_size, reducers=[HabitStats(4), GroupMass(groups)])
    try:
        with torch.no_grad():
            model(**enc) if padding else model(enc["input_ids"])  # no mask at all: the plain causal branch
        results = [module.uzr_recorder.take() for module in modules]
    finally:
        for module in modules:
            del module.uzr_recorder
    onehot = torch.nn.functional.one_hot(groups).float()
    sliding = [t == "sliding_attention" for t in getattr(model.config, "layer_types", [])]
    assert family != "gemma3" or any(sliding) and not all(sliding)
    for layer, result in enumerate(results):
        assert sorted(result) == ["group_mass", "habits"]
        want = eager.attentions[layer].float().mean(1) @ onehot  # (B, S, G)
        got = result["group_mass"]
        assert got.shape == want.shape
        torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-4, msg=f"L{layer}")
        assert (got[~real] == 0).all()  # padding rows see no key
        torch.testing.assert_close(got[real].sum(-1), torch.ones(int(real.sum())), atol=1e-5, rtol=0)


def test_recorder_results_by_name_and_argument_checks(tiny_models):
    model, tok = tiny_models["llama"]
    ids = tok(TEXTS[1], return_tensors="pt")["input_ids"]
    use_uzr_attention(model)
    module = attention_modules(model)[1]
    groups = groups_for(ids.shape[1])
    module.uzr_recorder = LayerRecorder(block_size=4, reducers=[HeadMeanRows(), GroupMass(groups)])
    standard = LayerRecorder(4, keep_head_mean=True, block_size=4)
    try:
        with torch.no_grad():
            model(ids)
        custom = module.uzr_recorder.take()
        module.uzr_recorder = standard
        with torch.no_grad():
            model(ids)
        stats, head_mean = standard.result()
    finally:
        del module.uzr_recorder
    assert sorted(custom) == ["group_mass", "head_mean"] and torch.equal(custom["head_mean"], head_mean)
    torch.testing.assert_close(custom["group_mass"], head_mean @ torch.nn.functional.one_hot(groups).float())
    assert set(stats) == {"entropy", "norm_entropy", "locality", "mean_distance"}
    assert standard["head_mean"].dist_rows is None and standard.take() == {}  # result() cleared it
    with pytest.raises(ValueError, match="not both"):
        LayerRecorder(keep_head_mean=True, block_size=4, reducers=[HabitStats(4)])
    with pytest.raises(ValueError, match="distinct"):
        LayerRecorder(block_size=4, reducers=[HabitStats(4), HabitStats(8)])
    with pytest.raises(TypeError, match="Reducer"):
        LayerRecorder(block_size=4, reducers=[object()])
    with pytest.raises(KeyError, match="head_mean"):
        LayerRecorder(4, block_size=4)["head_mean"]
