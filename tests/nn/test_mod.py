"""MixtureOfDepths around a block, against a float64 reference written here (a loop over sequences: gather the
chosen tokens, call the block on each sequence's tokens alone, write back x + r * (block - x)), forward and
backward including the router's gradient; positions and modality ids the block sees; batch-level routing (one row,
sequences kept apart by the attention mask); causal routing and decoding one token; aux losses; bad input."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsemm_kernels as smk
from sparsemm_kernels.nn import MixtureOfDepths, MoMaBlock, MoTBlock
from tests.ops.test_mod_route import loop_mod_route

D = 16


def _chosen(m, logits, B, S):
    """Per sequence b: the positions the reference routes (ascending)."""
    n = B * S if m.batch_level else S
    C = m.capacity if isinstance(m.capacity, int) else min(max(math.ceil(m.capacity * n), 1), n)
    if m.batch_level:
        flat = loop_mod_route(logits, C, True).tolist()
        return [[f % S for f in flat if f // S == b] for b in range(B)]
    return loop_mod_route(logits, C).tolist()


def loop_mod(m, x, ids=None):
    """The reference: every sequence's chosen tokens through the block alone, in order, at their positions."""
    B, S, _ = x.shape
    logits = x @ m.router.weight[0]
    r = torch.sigmoid(logits) if m.router_activation == "sigmoid" else logits
    out = x.clone()
    for b, sel in enumerate(_chosen(m, logits.detach(), B, S)):
        if not sel:
            continue
        sel_t = torch.tensor(sel)
        xs = x[b, sel_t][None]
        y = m.block(xs, ids[b, sel_t][None] if ids is not None else None, position_ids=sel_t[None])
        out = out.index_put((torch.tensor([b]), sel_t), (xs + r[b, sel_t][None, :, None] * (y - xs))[0])
    return out


def _pair(block, **kw):
    torch.manual_seed(0)
    m = MixtureOfDepths(block, D, **kw).double()
    with torch.no_grad():
        m.router.weight.normal_()
    return m, copy.deepcopy(m)


def _grads(mod):
    return {n: p.grad for n, p in mod.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("activation", ["sigmoid", None], ids=["sigmoid", "identity"])
@pytest.mark.parametrize("capacity", [0.125, 0.5, 1.0])
@pytest.mark.parametrize("batch_level", [False, True], ids=["per-sequence", "batch"])
def test_mot_block_matches_the_loop(capacity, activation, batch_level):
    m, ref = _pair(MoTBlock(D, 2, 24, 2), capacity=capacity, router_activation=activation,
                   batch_level=batch_level)
    B, S = 3, 8
    x = torch.randn(B, S, D, dtype=torch.float64, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    ids = torch.randint(0, 2, (B, S))
    y, want = m(x, ids), loop_mod(ref, xr, ids)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    dy = torch.randn_like(y)
    y.backward(dy)
    want.backward(dy)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-10)
    g, gr = _grads(m), _grads(ref)
    assert set(g) == set(gr) and "router.weight" in g
    for n in g:
        torch.testing.assert_close(g[n], gr[n], rtol=1e-9, atol=1e-10, msg=n)


class Recorder(nn.Module):
    """A block whose output depends on position and modality; records what it was given."""

    def __init__(self):
        super().__init__()
        self.seen = []
        self.emb = nn.Parameter(torch.randn(2, D, dtype=torch.float64))

    def forward(self, x, modality_ids, position_ids=None, **kwargs):
        self.seen.append((position_ids.clone(), None if modality_ids is None else modality_ids.clone(), kwargs))
        return x * (1 + position_ids[..., None]) + self.emb[modality_ids]


def test_block_sees_ascending_original_positions_and_ids():
    m, ref = _pair(Recorder(), capacity=0.5)
    x = torch.randn(2, 10, D, dtype=torch.float64)
    ids = torch.randint(0, 2, (2, 10))
    y = m(x, ids, position_ids=torch.arange(10) + 100)  # positions (S,) are broadcast per sequence
    pos, mids, kwargs = m.block.seen[-1]
    chosen = _chosen(m, (x @ m.router.weight[0]).detach(), 2, 10)
    assert pos.tolist() == [[100 + s for s in row] for row in chosen]
    assert mids.tolist() == [[int(ids[b, s]) for s in row] for b, row in enumerate(chosen)]
    assert kwargs == {}  # per-sequence routing passes no mask
    assert bool((pos[:, 1:] > pos[:, :-1]).all())
    skipped = torch.ones(2, 10, dtype=torch.bool)
    for b, row in enumerate(chosen):
        skipped[b, row] = False
    assert torch.equal(y[skipped], x[skipped])  # the rest skip the block exactly


def test_capacity_one_with_unit_weight_is_the_block():
    block = MoTBlock(D, 2, 24, 2).double()
    m = MixtureOfDepths(block, D, capacity=1.0, router_activation=None).double()
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0, 0] = 1.0
    x = torch.randn(2, 7, D, dtype=torch.float64)
    x[..., 0] = 1.0  # every logit is 1: r = 1
    ids = torch.randint(0, 2, (2, 7))
    torch.testing.assert_close(m(x, ids), block(x, ids), rtol=1e-12, atol=1e-12)


def test_ties_keep_exactly_capacity_tokens():
    m = MixtureOfDepths(Recorder(), D, capacity=0.25).double()
    with torch.no_grad():
        m.router.weight.zero_()  # every logit ties
    m(torch.randn(2, 8, D, dtype=torch.float64), torch.zeros(2, 8, dtype=torch.long))
    assert m.block.seen[-1][0].tolist() == [[0, 1], [0, 1]]


def test_batch_level_keeps_sequences_apart_with_one_call():
    m = MixtureOfDepths(Recorder(), D, capacity=0.25, batch_level=True).double()
    x = torch.randn(3, 8, D, dtype=torch.float64)
    m(x, torch.zeros(3, 8, dtype=torch.long))
    assert len(m.block.seen) == 1
    pos, _, kwargs = m.block.seen[-1]
    chosen = _chosen(m, (x @ m.router.weight[0]).detach(), 3, 8)
    assert pos.tolist() == [[s for row in chosen for s in row]]  # one row: sequence by sequence
    seq = torch.tensor([b for b, row in enumerate(chosen) for _ in row])
    assert torch.equal(kwargs["attn_mask"], (seq[:, None] == seq[None, :])[None, None])


def test_batch_level_moma_block_matches_one_masked_call():
    # MoD before the modality split: the block's expert choice competes over the batch's selected tokens only
    torch.manual_seed(3)
    block = MoMaBlock(D, 2, 24, experts_per_modality=(2, 2)).double()
    m = MixtureOfDepths(block, D, capacity=0.5, batch_level=True).double()
    x = torch.randn(2, 8, D, dtype=torch.float64)
    ids = torch.randint(0, 2, (2, 8))
    logits = (x @ m.router.weight[0]).detach()
    flat = loop_mod_route(logits, 8, True)
    b, s = flat // 8, flat % 8
    xs = x[b, s][None]
    mask = (b[:, None] == b[None, :])[None, None]
    y_sel = block(xs, ids[b, s][None], position_ids=s[None], attn_mask=mask)
    r = torch.sigmoid(logits)[b, s][None, :, None]
    want = x.clone()
    want[b, s] = (xs + r * (y_sel - xs))[0]
    torch.testing.assert_close(m(x, ids), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("aux", ["bce", "predictor"])
def test_causal_routing_decodes_one_token_without_top_k(aux, monkeypatch):
    m = MixtureOfDepths(MoTBlock(D, 2, 24, 2), D, capacity=0.5, aux=aux).double()
    x = torch.randn(2, 9, D, dtype=torch.float64)
    ids = torch.randint(0, 2, (2, 9))
    m.train()
    m(x, ids)
    assert m.aux_loss is not None and m.aux_loss.dim() == 0
    m.eval()
    m.causal_routing = True
    import sparsemm_kernels.nn.mod as mod_module

    monkeypatch.setattr(mod_module, "mod_route", lambda *a, **k: pytest.fail("causal routing called top-k"))
    with torch.no_grad():
        y1 = m(x[:, :1], ids[:, :1])  # S = 1: one decoding token
        y = m(x, ids)
        logits = x @ m.router.weight[0]
        prob = torch.sigmoid(logits) if aux == "bce" else torch.sigmoid(m.predictor(x).squeeze(-1))
    assert y1.shape == (2, 1, D) and m.aux_loss is None
    chosen = prob > 0.5
    # the reference: each sequence's predicted tokens through the block alone
    want = x.clone()
    for bi in range(2):
        sel = torch.arange(9)[chosen[bi]]
        if len(sel):
            with torch.no_grad():
                xs = x[bi, sel][None]
                yb = m.block(xs, ids[bi, sel][None], position_ids=sel[None])
                want[bi, sel] = (xs + torch.sigmoid(logits)[bi, sel][None, :, None] * (yb - xs))[0]
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)


def test_aux_losses_train_what_they_say():
    x = torch.randn(2, 8, D)
    ids = torch.zeros(2, 8, dtype=torch.long)
    m = MixtureOfDepths(Recorder().float(), D, capacity=0.5, aux="bce")
    m.block.emb.data = m.block.emb.data.float()
    m(x, ids)
    logits = x @ m.router.weight[0]
    target = torch.zeros(2, 8)
    for b, row in enumerate(loop_mod_route(logits.detach(), 4).tolist()):
        target[b, row] = 1.0
    torch.testing.assert_close(m.aux_loss, F.binary_cross_entropy_with_logits(logits, target))
    p = MixtureOfDepths(Recorder().float(), D, capacity=0.5, aux="predictor")
    p.block.emb.data = p.block.emb.data.float()
    p(x, ids)
    p.aux_loss.backward()
    assert p.router.weight.grad is None  # the predictor's loss reaches the predictor only
    assert all(q.grad is not None for q in p.predictor.parameters())


def test_compiles_fullgraph_with_eager_equal_results():
    m = MixtureOfDepths(MoTBlock(D, 2, 24, 2), D, capacity=0.5)
    x = torch.randn(2, 8, D)
    ids = torch.randint(0, 2, (2, 8))
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, ids), m(x, ids), rtol=1e-5, atol=1e-5)


class Wrong(nn.Module):
    def forward(self, x, modality_ids, position_ids=None):
        return x[..., :1]  # drops the features


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="`capacity`"):
        MixtureOfDepths(Recorder(), D, capacity=1.5)
    with pytest.raises(ValueError, match="`capacity`"):
        MixtureOfDepths(Recorder(), D, capacity=0.0)
    with pytest.raises(TypeError, match="`capacity`"):
        MixtureOfDepths(Recorder(), D, capacity="all")
    with pytest.raises(ValueError, match="`router_activation`"):
        MixtureOfDepths(Recorder(), D, router_activation="relu")
    with pytest.raises(ValueError, match="`aux`"):
        MixtureOfDepths(Recorder(), D, aux="mse")
    with pytest.raises(TypeError, match="`block`"):
        MixtureOfDepths(lambda x: x, D)
    m = MixtureOfDepths(Recorder(), D, capacity=9).double()
    x = torch.randn(2, 8, D, dtype=torch.float64)
    with pytest.raises(ValueError, match="`capacity`"):
        m(x)  # C = 9 > S = 8
    with pytest.raises(ValueError, match="`x`"):
        MixtureOfDepths(Recorder(), D)(torch.randn(2, 8, D + 1))
    with pytest.raises(ValueError, match="Wrong"):
        MixtureOfDepths(Wrong(), D)(torch.randn(2, 8, D))
    with pytest.raises(ValueError, match="`modality_ids`"):
        MixtureOfDepths(Recorder(), D)(torch.randn(2, 8, D), torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="`position_ids`"):
        MixtureOfDepths(Recorder(), D)(torch.randn(2, 8, D), position_ids=torch.arange(7))
    with pytest.raises(ValueError, match="`attn_mask`"):
        MixtureOfDepths(Wrong(), D, batch_level=True)(torch.randn(2, 8, D))  # a block that takes no mask
    assert smk.nn.MixtureOfDepths is MixtureOfDepths


@pytest.mark.parametrize("batch_level", [False, True], ids=["per-sequence", "batch"])
def test_triton_routing_and_combine_match_the_loop(batch_level):
    from sparsemm_kernels.backend import unsupported_reasons

    for op in ("expert_choice_route", "mod_combine"):
        if unsupported_reasons(op, "triton", torch.device("cpu"), torch.float32):
            pytest.skip(f"triton cannot run {op} here")
    torch.manual_seed(0)
    m = MixtureOfDepths(MoTBlock(D, 2, 24, 2), D, capacity=0.5, batch_level=batch_level, backend="triton")
    ref = copy.deepcopy(m).double()
    x = torch.randn(2, 8, D, requires_grad=True)
    xr = x.detach().double().requires_grad_()
    ids = torch.randint(0, 2, (2, 8))
    y, want = m(x, ids), loop_mod(ref, xr, ids)
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)
    y.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.router.weight.grad.double(), ref.router.weight.grad, rtol=1e-4, atol=1e-4)
