"""Two-expert sampling (Wan2.2 A14B): the snapped grid and the router against the Gaussian closed form.

The two experts are two *different* Gaussians' exact flow maps (`anyflow.gaussian.GaussianData`): the
composed PF-ODE runs the high-noise expert H above the boundary b and the low-noise expert L below, so its
exact map from noise is ``Phi_L(b -> 0) o Phi_H(1 -> b)``. A sampler that never crosses b with its steps and
hands each step to the expert of its range reproduces it for every N; routing by the start time does not
(docs/design/anyflow.md 2.1; benchmarks/two_expert_routing.py for the full comparison).
"""
import pytest
import torch

from megatron_anyflow.anyflow.gaussian import GaussianData
from megatron_anyflow.anyflow.sampler import FlowMapEulerSampler, route_experts
from megatron_anyflow.anyflow.timesteps import flow_map_time_grid, to_model_scale, two_expert_time_grid

SHAPE = (3, 2, 4, 4)  # [f, c, h, w]


def _experts():
    """(H, L): far-apart Gaussians (L's mean mirrored, its std doubled), so a wrong routing shows."""
    mu = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return GaussianData(mu, 0.5), GaussianData(-mu, 1.0)


def _noise(b=4):
    return torch.randn((b, *SHAPE), generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("boundary", [0.875, 0.9, 0.3])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 16])
def test_two_expert_grid_snaps_the_nearest_point_onto_the_boundary(n, boundary):
    grid, plain = two_expert_time_grid(n, 5.0, boundary), flow_map_time_grid(n, 5.0)
    assert grid.dtype == torch.float64 and grid[0] == 1.0 and grid[-1] == 0.0
    assert bool((grid[1:] < grid[:-1]).all()), grid  # strictly decreasing
    assert int((grid == boundary).sum()) == 1
    if n == 1:  # the one jump is split at b: two evaluations
        assert grid.tolist() == [1.0, boundary, 0.0]
        return
    assert len(grid) == n + 1
    moved = (grid != plain).nonzero().flatten().tolist()
    nearest = 1 + int(torch.argmin((plain[1:-1] - boundary).abs()))
    assert moved in ([], [nearest]) and grid[nearest] == boundary
    # no step crosses b
    assert not any(t > boundary > r for t, r in zip(grid[:-1].tolist(), grid[1:].tolist()))


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.2, 1.5, "high"])
def test_bad_boundaries_are_named(bad):
    with pytest.raises(ValueError, match="boundary"):
        two_expert_time_grid(4, 5.0, bad)
    with pytest.raises(ValueError, match="boundary"):
        FlowMapEulerSampler(4, boundary=bad)
    if not isinstance(bad, str):
        with pytest.raises(ValueError, match="boundary"):
            route_experts(lambda *a: None, lambda *a: None, bad)


@pytest.mark.parametrize("boundary", [0.875, 0.9])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_snapped_sampler_with_routed_experts_is_the_exact_composed_map(n, boundary):
    hi, lo = _experts()
    noise = _noise()
    sampler = FlowMapEulerSampler(n, boundary=boundary)
    assert sampler.num_steps == (2 if n == 1 else n)  # model evaluations
    x = sampler(route_experts(hi.exact_model(), lo.exact_model(), boundary), noise, None)
    exact = lo.flow_map(hi.flow_map(noise, 1.0, boundary), boundary, 0.0)
    # Exact up to the float32 model-scale times: the Euler update uses the float64 grid difference while the
    # average velocity is that of the float32 times, a relative mismatch ~1e-7 per step on |z| ~ 3: far
    # below 1e-5 (the tolerance of the single-expert exactness test in tests/test_sampler.py).
    torch.testing.assert_close(x, exact, rtol=0, atol=1e-5)

    # The control: the plain grid routed by the start time (diffusers' per-timestep rule, t >= b -> H) runs
    # the crossing step's part below b on H's field and misses the exact map by far more.
    B = float(to_model_scale(boundary))
    by_t = FlowMapEulerSampler(n)(lambda z, T, R, c: (hi if bool((T >= B).all()) else lo).exact_model()(z, T, R, c),
                                  noise, None)
    assert float((by_t - exact).abs().max()) > 1e-2


def test_the_router_refuses_a_crossing_jump_and_gives_a_jump_from_b_to_the_low_expert():
    hi, lo = _experts()
    calls = []

    def rec(name, exp):
        def model(z, T, R, c):
            calls.append(name)
            return exp.exact_model()(z, T, R, c)
        return model

    model = route_experts(rec("H", hi), rec("L", lo), 0.875)
    z = _noise(2)
    B = to_model_scale(0.875).expand(2, SHAPE[0]).clone()
    model(z, torch.full_like(B, 1000.0), B, None)  # [b, 1]: H
    model(z, B, torch.full_like(B, 400.0), None)  # starts exactly at b: lies below it, L
    assert calls == ["H", "L"]
    with pytest.raises(ValueError, match="crosses the expert boundary"):
        model(z, torch.full_like(B, 937.5), torch.full_like(B, 833.0), None)
    # the plain 4-step Wan grid has a crossing step (0.9375 -> 0.8333): refused, not silently mis-routed
    with pytest.raises(ValueError, match="two_expert_time_grid"):
        FlowMapEulerSampler(4)(model, z, None)
