"""The live teacher oracle (``inject.source=teacher`` for facts QA and generation): the teacher reads the student's
text itself; its rows equal the harvest's, and decoding with it equals a whole-sequence pass."""

from __future__ import annotations

import numpy as np
import torch

from uzr.harvest.harvester import Harvester
from uzr.injection.injector import AlphaSpec, Injector
from uzr.injection.oracle import TeacherPrior
from uzr.injection.priors import AttentionCall

from .test_per_head import TEXTS

LAYER, TEACHER_LAYER = 1, 2


def full_call(ids: torch.Tensor) -> AttentionCall:
    s = ids.shape[1]
    pos = torch.arange(s)
    return AttentionCall(None, torch.zeros(1, s, 1), None, None, torch.ones(1, s, s, dtype=torch.bool).tril(), pos,
                         pos, ids)


def test_live_rows_equal_the_harvest_rows_across_tokenizers(tiny_models):
    """Gemma-style BPE teacher, character student: the live oracle is the harvest's alignment of the same text."""
    teacher, t_tok = tiny_models["gemma3"]
    student, s_tok = tiny_models["llama"]
    h = Harvester(teacher, t_tok, student, s_tok, [LAYER], [TEACHER_LAYER], window=4, block_size=8, max_length=256,
                  max_dist_len=256)  # whole texts: a cut text ends another teacher token
    try:
        rows = [h(text) for text in TEXTS[:1]]
    finally:
        h.close()
    prior = TeacherPrior(teacher, t_tok, s_tok, {LAYER: TEACHER_LAYER})
    for row in rows:
        ids = torch.as_tensor(np.asarray(row["input_ids"]), dtype=torch.long)[None]
        live = prior.scores(LAYER, full_call(ids), None)[0, 0].exp()  # (S, S)
        stored = torch.as_tensor(row[f"teacher_dist_L{LAYER}"].astype(np.float32))
        torch.testing.assert_close(live, stored.clamp_min(1e-6), atol=2e-3, rtol=0)  # float16 storage


def test_decoding_with_the_live_oracle_equals_a_whole_sequence_pass(tiny_models):
    """Greedy decoding: the teacher follows the growing text with its own KV cache (re-running when its tokens of
    the prefix change); every step's logits equal those of one pass over the finished sequence."""
    teacher, t_tok = tiny_models["gemma3"]
    student, s_tok = tiny_models["llama"]
    ids = s_tok(["The quick brown fox"], return_tensors="pt")["input_ids"]

    def injector():
        return Injector(TeacherPrior(teacher, t_tok, s_tok, {LAYER: TEACHER_LAYER}), AlphaSpec(value=1.0), "mix")

    with torch.no_grad(), injector().attach(student) as edit:
        out = student.generate(ids, max_new_tokens=12, do_sample=False, output_logits=True,
                               return_dict_in_generate=True, pad_token_id=s_tok.pad_token_id)
        steps = torch.stack(out.logits, 1)[0]  # (12, V)
        prior = edit.prior
    with torch.no_grad(), injector().attach(student):
        full = student(input_ids=out.sequences).logits[0, ids.shape[1] - 1:-1]  # (12, V)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
    # the teacher followed the text with its cache: fewer positions than re-running every prefix from scratch
    lengths = [len(t_tok(s_tok.decode(out.sequences[0, :n]))["input_ids"]) for n in range(ids.shape[1], out.sequences.shape[1])]
    assert 0 < prior.teacher_tokens_run < sum(lengths)
    plain = student(input_ids=out.sequences).logits[0, ids.shape[1] - 1:-1]
    assert (plain - full).abs().max() > 1e-3  # and the oracle changed what the student predicts


def test_right_padded_rows_are_each_texts_own(tiny_models):
    """Facts QA runs candidates as right-padded batches: each row's oracle is its own text's, padding ignored."""
    teacher, t_tok = tiny_models["gemma3"]
    _, s_tok = tiny_models["llama"]
    texts = ["Paris is the capital", "Rome"]
    seqs = [s_tok(t)["input_ids"] for t in texts]
    s = max(map(len, seqs))
    ids = torch.tensor([q + [s_tok.pad_token_id] * (s - len(q)) for q in seqs])
    real = torch.tensor([[j < len(q) for j in range(s)] for q in seqs])
    pos = torch.arange(s)
    call = AttentionCall(None, torch.zeros(2, s, 1), None, None,
                         torch.ones(1, s, s, dtype=torch.bool).tril() & real[:, None, :], pos, pos, ids)
    batch = TeacherPrior(teacher, t_tok, s_tok, {LAYER: TEACHER_LAYER}).scores(LAYER, call, None)  # (2, 1, s, s)
    for b, q in enumerate(seqs):
        alone = TeacherPrior(teacher, t_tok, s_tok, {LAYER: TEACHER_LAYER}).scores(LAYER, full_call(torch.tensor([q])),
                                                                                   None)[0]
        torch.testing.assert_close(batch[b, :, :len(q), :len(q)], alone)
