"""Every module under torch.distributed on CPU: two gloo ranks with DDP, and with FSDP2 (``fully_shard`` on each block
and on the model), each rank a different half of the batch, against one process that runs the two halves apart and
averages their losses (routing is per rank, as the papers trained: per-device batches). Loss and every gradient, in
float64."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

D = 16


def _case(name: str):
    """``(model, batch(rank) -> inputs, blocks to fully_shard first)``, the same on every rank (seeded)."""
    from sparsemm_kernels.nn import (
        AvgKFeedForward,
        ExpertChoiceMoE,
        MixtureOfDepths,
        MoMaFeedForward,
        MoTBlock,
        MoTTransformer,
        TokenChoiceMoE,
    )

    torch.manual_seed(0)

    def tokens(rank):
        g = torch.Generator().manual_seed(10 + rank)
        return (torch.randint(0, 50, (2, 8), generator=g), torch.randint(0, 2, (2, 8), generator=g))

    def rows(rank, shape=(2, 8)):
        g = torch.Generator().manual_seed(20 + rank)
        return (torch.randn(*shape, D, generator=g, dtype=torch.float64), torch.randint(0, 2, shape, generator=g))

    if name == "mot":
        m = MoTTransformer(50, D, 2, 2, 24, 2, dtype=torch.float64)
        return m, tokens, list(m.layers)
    if name == "expert_choice":
        return ExpertChoiceMoE(D, 24, 4, dtype=torch.float64), lambda r: rows(r)[:1], []
    if name == "moma_ffn":
        return MoMaFeedForward(D, 24, (2, 2), dtype=torch.float64), rows, []
    if name == "token_choice":
        return TokenChoiceMoE(D, 24, 4, top_k=2, dtype=torch.float64), lambda r: rows(r)[:1], []
    if name in ("mod", "mod_batch"):
        m = MixtureOfDepths(MoTBlock(D, 2, 24, 2), D, capacity=0.5, batch_level=name == "mod_batch").double()
        return m, rows, [m.block]
    if name == "avgk":
        return AvgKFeedForward(D, 32, 4, 2, glu=True, bias=True, dtype=torch.float64), lambda r: rows(r)[:1], []
    raise ValueError(name)


CASES = ["mot", "expert_choice", "moma_ffn", "token_choice", "mod", "mod_batch", "avgk"]


def _loss(model, inputs):
    return model(*inputs).square().mean()


def _two_ranks(rank: int, rendezvous: str, body, args) -> None:
    """One rank of a two-rank gloo run of ``body(rank, *args)``."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        body(rank, *args)
        dist.barrier()  # nobody tears gloo down while the other rank still talks to it
    finally:
        dist.destroy_process_group()
    # The work is done and written: leave without the interpreter's teardown, where gloo's background threads
    # sometimes abort the process ("terminate called without an active exception") after a correct run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(tmp_path, body, *args) -> None:
    mp.spawn(_two_ranks, args=(str(tmp_path / "rendezvous"), body, args), nprocs=2, join=True)


def _wrapped_runs(rank: int, mode: str, out: str) -> None:
    results = {}
    for name in CASES:
        model, batch, blocks = _case(name)
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (2,))
            for block in blocks:
                fully_shard(block, mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh)
        loss = _loss(wrapped, batch(rank))
        loss.backward()
        grads = {}
        for n, p in model.named_parameters():
            g = p.grad
            grads[n] = None if g is None else (g.full_tensor() if hasattr(g, "full_tensor") else g).detach()
        losses = [torch.zeros(()) for _ in range(2)]
        dist.all_gather(losses, loss.detach().float().reshape(()))
        results[name] = {"grads": grads, "losses": [float(t) for t in losses]}
    if rank == 0:
        torch.save(results, out)


def _global_run(rank: int, out: str, kind: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    model, batch = _global_case(kind)
    model.selection_group = dist.group.WORLD
    x, mask = batch(rank)
    wrapped = DistributedDataParallel(model)  # kept alive until backward: its reducer averages the grads
    loss = wrapped(x, mask).square().mean()
    loss.backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters()}, out)


def _global_case(kind: str = "expert_choice"):
    """A layer whose choice looks at the whole batch, and each rank's half of it (the same size on both)."""
    from sparsemm_kernels.nn import ExpertChoiceMoE, MixtureOfDepths, MoMaFeedForward, MoTBlock

    torch.manual_seed(1)
    if kind == "expert_choice":
        model = ExpertChoiceMoE(D, 24, 4, capacity_factor=1.5, dtype=torch.float64)

        def batch(rank):
            g = torch.Generator().manual_seed(30 + rank)
            return torch.randn(12, D, generator=g, dtype=torch.float64), torch.rand(12, generator=g) > 0.2

        return model, batch
    if kind == "moma_ffn":
        model = MoMaFeedForward(D, 24, (2, 2), capacity_factor=1.0, dtype=torch.float64)

        def batch(rank):
            g = torch.Generator().manual_seed(60 + rank)
            return torch.randn(12, D, generator=g, dtype=torch.float64), torch.randint(0, 2, (12,), generator=g)

        return model, batch
    model = MixtureOfDepths(MoTBlock(D, 2, 24, 2), D, capacity=0.25, batch_level=True).double()

    def batch(rank):
        g = torch.Generator().manual_seed(50 + rank)
        return torch.randn(2, 8, D, generator=g, dtype=torch.float64), torch.randint(0, 2, (2, 8), generator=g)

    return model, batch


@pytest.mark.parametrize("kind", ["expert_choice", "moma_ffn", "mod_batch"])
def test_global_selection_over_two_ranks_equals_one_process_with_the_whole_batch(kind, tmp_path):
    out = str(tmp_path / "results.pt")
    _spawn(tmp_path, _global_run, out, kind)
    got = torch.load(out)
    model, batch = _global_case(kind)
    (x0, m0), (x1, m1) = batch(0), batch(1)
    model(torch.cat([x0, x1]), torch.cat([m0, m1])).square().mean().backward()  # every token competes at once
    per_rank, _ = _global_case(kind)
    (per_rank(x0, m0).square().mean() + per_rank(x1, m1).square().mean()).backward()
    differs = False
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-10, atol=1e-12, msg=n)
        differs |= not torch.allclose(p.grad, dict(per_rank.named_parameters())[n].grad / 2)
    assert differs  # the global choice is not the per-rank one on this batch


def _ep_run(rank: int, out: str) -> None:
    from sparsemm_kernels.nn import TokenChoiceMoE

    with pytest.raises(ValueError, match="`num_experts`"):  # 3 experts do not shard over 2 ranks
        TokenChoiceMoE(D, 24, 3, expert_parallel_group=dist.group.WORLD)
    full, batch = _ep_case()
    layer = TokenChoiceMoE(D, 24, 4, top_k=2, dtype=torch.float64, expert_parallel_group=dist.group.WORLD)
    with torch.no_grad():  # the same weights as the one-process layer: this rank's half of the experts
        layer.router.weight.copy_(full.router.weight)
        for name in ("w1", "w3", "w2"):
            getattr(layer, name).copy_(getattr(full, name)[2 * rank:2 * rank + 2])
    y = layer(batch(rank))
    y.square().sum().backward()
    dist.all_reduce(layer.router.weight.grad)  # the replicated router: summed over the data-parallel ranks
    gathered = {}
    for name in ("w1", "w3", "w2"):
        parts = [torch.empty_like(getattr(layer, name).grad) for _ in range(2)]
        dist.all_gather(parts, getattr(layer, name).grad)
        gathered[name] = torch.cat(parts)
    outs = [torch.empty_like(y) for _ in range(2)]
    dist.all_gather(outs, y.detach())
    if rank == 0:
        torch.save({"y": torch.cat(outs), "router": layer.router.weight.grad, **gathered}, out)


def _ep_case():
    from sparsemm_kernels.nn import TokenChoiceMoE

    torch.manual_seed(2)
    full = TokenChoiceMoE(D, 24, 4, top_k=2, dtype=torch.float64)

    def batch(rank):
        return torch.randn(11, D, generator=torch.Generator().manual_seed(40 + rank), dtype=torch.float64)

    return full, batch


def test_expert_parallel_token_choice_equals_one_process_with_every_expert(tmp_path):
    out = str(tmp_path / "results.pt")
    _spawn(tmp_path, _ep_run, out)
    got = torch.load(out)
    full, batch = _ep_case()
    x = torch.cat([batch(0), batch(1)])
    y = full(x)
    y.square().sum().backward()
    torch.testing.assert_close(got["y"], y.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["router"], full.router.weight.grad, rtol=1e-10, atol=1e-12)
    for name in ("w1", "w3", "w2"):
        torch.testing.assert_close(got[name], getattr(full, name).grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_gloo_ranks_equal_one_process(mode, tmp_path):
    out = str(tmp_path / "results.pt")
    _spawn(tmp_path, _wrapped_runs, mode, out)
    results = torch.load(out)
    assert set(results) == set(CASES)
    for name in CASES:
        model, batch, _ = _case(name)
        halves = [_loss(model, batch(r)) for r in range(2)]
        ((halves[0] + halves[1]) / 2).backward()
        got = results[name]
        for r in range(2):
            assert got["losses"][r] == pytest.approx(float(halves[r].detach()), rel=1e-6), (name, r)
        for n, p in model.named_parameters():
            want = p.grad
            if want is None:
                assert got["grads"][n] is None, (name, n)
                continue
            torch.testing.assert_close(got["grads"][n], want, rtol=1e-10, atol=1e-12, msg=f"{mode} {name} {n}")
