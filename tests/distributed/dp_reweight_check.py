"""Adaptive reweighting across data-parallel ranks: DP = 2 must reproduce DP = 1 (loss and gradients).

    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/distributed/dp_reweight_check.py OUT.pt                                     # DP = 2 (gloo)
    python tests/distributed/dp_reweight_check.py OUT.pt                                  # DP = 1
    reference()                                                   # DP = 1 in-process (no process group)

A fixed global batch of 8 samples (latents, prompts, noise from fixed seeds) and a small fixed
ToyFlowMapNet (text-conditioned, every parameter with a gradient). Every rank draws (t, r) from the same
time generator over the global batch of 8 and takes its rows ``[rank * b, (rank + 1) * b)``; the noise is
the rank's slice of one global noise tensor (``stage1_loss(..., noise=...)``), so DP = 1 and DP = 2 see
identical samples. Text dropout and i2v are off (their draws come from per-rank generators).
With the default split (50% boundary, 25% r = 0, 25% free) rank 0 holds all 4 boundary samples and rank 1
none: rank 1's reweighting needs the boundary mean gathered from rank 0.

Each rank computes the loss over its local batch and backpropagates; gradients and losses are then
averaged over the DP group (what DDP does). Rank 0 saves ``dict(loss, grads, per_sample_loss, scales,
boundary_mean, num_boundary, num_boundary_local, loss_local_only)`` to OUT (``per_sample_loss`` and
``scales`` gathered over ranks in sample order; ``loss_local_only`` is the DP-mean loss when every rank
reweights with its own boundary samples only, ``dp_group=None``: the wrong answer the gather avoids).
"""
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

GLOBAL_BATCH = 8
SHAPE = (2, 2, 2, 2)
L, D = 3, 4


def build_model():
    from megatron_anyflow.testing.toy import ToyFlowMapNet

    torch.manual_seed(0)
    net = ToyFlowMapNet(SHAPE, hidden=16, n_freq=2, use_text=True)
    with torch.no_grad():
        for p in net.corr_net[-1].parameters():
            p.normal_(0, 0.1)
    return net


def global_inputs():
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(GLOBAL_BATCH, *SHAPE, generator=g)
    text = torch.randn(GLOBAL_BATCH, L, D, generator=g)
    neg = torch.randn(1, L, D, generator=g)
    noise = torch.randn(GLOBAL_BATCH, *SHAPE, generator=g)
    return x, text, neg, noise


def compute(rank, world, dp_group, all_reduce_group=None):
    """Loss / gradients of rank ``rank`` of ``world`` (DP-averaged over ``all_reduce_group`` if given).

    ``dp_group`` is passed to ``stage1_loss`` (None: reweight with local boundary samples only).
    Returns ``(loss, grads, stats)``.
    """
    from megatron_anyflow.anyflow import FlowMapObjectiveConfig, stage1_loss

    assert GLOBAL_BATCH % world == 0
    b = GLOBAL_BATCH // world
    sl = slice(rank * b, (rank + 1) * b)
    x, text, neg, noise = global_inputs()
    cfg = FlowMapObjectiveConfig(text_dropout=0.0, i2v_prob=0.0)
    model = build_model()
    loss, stats = stage1_loss(model, x[sl], text[sl], neg, cfg,
                              time_generator=torch.Generator().manual_seed(7),
                              noise_generator=torch.Generator().manual_seed(100 + rank),
                              global_batch=GLOBAL_BATCH, global_offset=rank * b, dp_group=dp_group,
                              noise=noise[sl])
    loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    loss_avg = loss.detach().clone()
    if all_reduce_group is not None and world > 1:  # what DDP does: average gradients over DP
        for gr in grads:
            dist.all_reduce(gr, group=all_reduce_group)
            gr /= world
        dist.all_reduce(loss_avg, group=all_reduce_group)
        loss_avg /= world
    return loss_avg, grads, stats


def reference():
    """DP = 1 in the calling process (no process group needed: ``dp_group=None`` is local)."""
    loss, grads, stats = compute(0, 1, None)
    return dict(world=1, loss=loss, grads=grads, per_sample_loss=stats["per_sample_loss"], scales=stats["scales"],
                boundary_mean=stats["boundary_mean"], num_boundary=stats["num_boundary"],
                num_boundary_local=stats["num_boundary_local"].reshape(1).to(torch.float64),
                loss_local_only=loss)


def main(out_path):
    torch.set_num_threads(1)
    from megatron.core import parallel_state

    from megatron_anyflow.parallel.state import destroy_parallel, initialize_parallel

    initialize_parallel(tensor_model_parallel_size=1)
    group = parallel_state.get_data_parallel_group()
    world = dist.get_world_size(group=group)
    rank = dist.get_rank(group=group)

    loss, grads, stats = compute(rank, world, group, group)
    loss_local_only, _, _ = compute(rank, world, None, group)

    def gather(t):
        if world == 1:
            return t.clone()
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.cat(parts)

    per_sample = gather(stats["per_sample_loss"])
    scales = gather(stats["scales"])
    n_local = gather(stats["num_boundary_local"].reshape(1).to(torch.float64))
    if rank == 0:
        torch.save(dict(world=world, loss=loss, grads=grads, per_sample_loss=per_sample, scales=scales,
                        boundary_mean=stats["boundary_mean"], num_boundary=stats["num_boundary"],
                        num_boundary_local=n_local, loss_local_only=loss_local_only), out_path)
    destroy_parallel()


if __name__ == "__main__":
    main(sys.argv[1])
    # every rank ends its groups after a barrier: a gloo group left to interpreter exit can abort a rank
    # whose peer is still writing (megatron_anyflow/cli.py, end_process_groups)
    from megatron_anyflow.cli import end_process_groups

    end_process_groups()
