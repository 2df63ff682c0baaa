"""Closed-form ground truth for Gaussian data: exact velocity, flow map and average velocity.

For data ``x ~ N(mu, s^2 I)`` and the interpolation ``z_t = (1 - t) x + t eps`` (``eps ~ N(0, I)``,
t = 1 noise, t = 0 data) the marginal of ``z_t`` is ``N(m_t, sd_t^2 I)`` with

    m_t    = (1 - t) mu,
    sd_t^2 = (1 - t)^2 s^2 + t^2.

The probability-flow ODE transports each marginal to the next by the affine map that matches mean and
standard deviation, so its exact flow map (paper Sec. 3: ``Phi_{t->r}``) is

    f(z_t, t, r) = m_r + (sd_r / sd_t) (z_t - m_t).

Differentiating ``z_r = f(z_t, t, r)`` in ``r`` along the trajectory gives the instantaneous velocity
``dz/dt = dm/dt + (d sd/dt / sd)(z - m)`` with ``dm/dt = -mu`` and
``d sd/dt = (t - (1 - t) s^2) / sd`` (from ``d sd^2/dt = -2 (1 - t) s^2 + 2 t``), i.e.

    v(z, t) = -mu + (t - (1 - t) s^2) / sd_t^2 * (z - m_t).

This equals ``E[eps - x | z_t = z]`` (the flow-matching target's conditional mean): at t = 1 it is
``z - mu``, at t = 0 it is ``-z``. The average velocity on ``[r, t]`` (the flow-map parameterisation
``f = z - (t - r) u``) is ``u(z, t, r) = (z - f(z, t, r)) / (t - r)``, with ``u(z, t, t) = v(z, t)``.

All arithmetic is done in float64; results are returned in the dtype of the input ``z``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch

__all__ = ["GaussianData"]

TimeLike = Union[torch.Tensor, float]


class GaussianData:
    """Gaussian data ``x ~ N(mu, s^2 I)`` in latent layout, with its exact PF-ODE quantities.

    Args:
        mu: mean; a tensor of the per-sample latent shape ``[f, c, h, w]`` (or any per-sample shape), or a
            scalar (Python number or 0-d tensor) broadcast over ``shape``.
        s: data standard deviation, a positive float.
        shape: per-sample shape used by :meth:`sample` when ``mu`` is a scalar (ignored otherwise,
            except that it must then equal ``mu.shape`` if given).

    Raises:
        ValueError: ``s <= 0`` or not finite; ``shape`` inconsistent with a tensor ``mu``.

    Times ``t, r`` passed to the methods are in ``[0, 1]`` (not the 0..1000 scale) and may be Python
    floats, 0-d tensors, ``[b]`` tensors (one time per sample) or ``[b, f]`` tensors (one time per sample
    and frame); they are broadcast against ``z`` of shape ``[b, *shape]`` by appending singleton dims.
    """

    def __init__(self, mu: Union[torch.Tensor, float], s: float, shape: Optional[Sequence[int]] = None):
        s = float(s)
        if not math.isfinite(s) or s <= 0.0:
            raise ValueError(f"s must be a positive finite float, got {s!r}")
        self.s = s
        mu_t = torch.as_tensor(mu, dtype=torch.float64).detach().cpu()
        if mu_t.dim() == 0:
            self.shape = tuple(int(d) for d in shape) if shape is not None else None
        else:
            if shape is not None and tuple(shape) != tuple(mu_t.shape):
                raise ValueError(f"shape {tuple(shape)} does not match mu.shape {tuple(mu_t.shape)}")
            self.shape = tuple(mu_t.shape)
        self.mu = mu_t

    # ------------------------------------------------------------------ helpers
    def _time(self, t: TimeLike, z: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64, device=z.device)
        if t.dim() > z.dim():
            raise ValueError(f"time of shape {tuple(t.shape)} cannot broadcast against z {tuple(z.shape)}")
        return t.reshape(*t.shape, *([1] * (z.dim() - t.dim())))

    def _mu(self, z: torch.Tensor) -> torch.Tensor:
        return self.mu.to(device=z.device)

    def mean(self, t: TimeLike, z: torch.Tensor) -> torch.Tensor:
        """``m_t = (1 - t) mu`` (float64, broadcast to ``z``'s rank)."""
        return (1.0 - self._time(t, z)) * self._mu(z)

    def std(self, t: TimeLike, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``sd_t = sqrt((1 - t)^2 s^2 + t^2)`` (float64; broadcast to ``z``'s rank when ``z`` is given)."""
        tt = self._time(t, z) if z is not None else torch.as_tensor(t, dtype=torch.float64)
        return torch.sqrt((1.0 - tt) ** 2 * self.s ** 2 + tt ** 2)

    # ------------------------------------------------------------------ API
    def sample(self, n: int, generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32,
               device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
        """Draw ``n`` data samples ``x = mu + s * N(0, I)``.

        Returns:
            ``[n, *shape]`` tensor of ``dtype`` (float32 by default) on ``device`` (default: the
            generator's device, CPU if none). The normal draw is float64 on the generator's device.

        Raises:
            ValueError: ``n`` < 1, or ``mu`` is a scalar and no ``shape`` was given.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        if self.shape is None:
            raise ValueError("mu is a scalar: pass shape=... to GaussianData to sample")
        gen_device = generator.device if generator is not None else torch.device("cpu")
        eps = torch.randn((n, *self.shape), generator=generator, device=gen_device, dtype=torch.float64)
        x = self.mu.to(gen_device) + self.s * eps
        out_device = torch.device(device) if device is not None else gen_device
        return x.to(device=out_device, dtype=dtype)

    def velocity(self, z: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """Exact instantaneous PF-ODE velocity ``v(z, t) = -mu + (t - (1-t) s^2) / sd_t^2 * (z - m_t)``.

        Args:
            z: ``[b, *shape]`` state at time ``t``.
            t: time(s) in ``[0, 1]``: float, ``[b]`` or ``[b, f]``.

        Returns:
            ``dz/dt`` with ``z``'s shape and dtype (velocity per unit of t in [0, 1]; equals
            ``E[eps - x | z_t = z]``).
        """
        zz = z.to(torch.float64)
        tt = self._time(t, zz)
        m = (1.0 - tt) * self._mu(zz)
        var = (1.0 - tt) ** 2 * self.s ** 2 + tt ** 2
        v = -self._mu(zz) + (tt - (1.0 - tt) * self.s ** 2) / var * (zz - m)
        return v.to(z.dtype)

    def flow_map(self, z: torch.Tensor, t: TimeLike, r: TimeLike) -> torch.Tensor:
        """Exact flow map ``f(z_t, t, r) = m_r + (sd_r / sd_t)(z_t - m_t)`` (any ``t, r`` in [0, 1]).

        Args:
            z: ``[b, *shape]`` state at time ``t``.
            t, r: times in ``[0, 1]`` (float, ``[b]`` or ``[b, f]``); ``r <= t`` integrates toward data,
                but the map is exact in both directions.

        Returns:
            ``z_r`` with ``z``'s shape and dtype.
        """
        zz = z.to(torch.float64)
        tt = self._time(t, zz)
        rr = self._time(r, zz)
        mu = self._mu(zz)
        sd_t = torch.sqrt((1.0 - tt) ** 2 * self.s ** 2 + tt ** 2)
        sd_r = torch.sqrt((1.0 - rr) ** 2 * self.s ** 2 + rr ** 2)
        out = (1.0 - rr) * mu + (sd_r / sd_t) * (zz - (1.0 - tt) * mu)
        return out.to(z.dtype)

    def average_velocity(self, z: torch.Tensor, t: TimeLike, r: TimeLike) -> torch.Tensor:
        """Exact average velocity ``u(z, t, r) = (z - f(z, t, r)) / (t - r)``; ``u(z, t, t) = v(z, t)``.

        Elementwise: where ``t == r`` the instantaneous :meth:`velocity` is returned. Computed in float64
        (the difference quotient loses about ``1e-16 / |t - r|`` relative accuracy for tiny ``t - r``).

        Returns:
            ``[b, *shape]`` with ``z``'s dtype, per unit of t in [0, 1], so that
            ``flow_map(z, t, r) == z - (t - r) * average_velocity(z, t, r)``.
        """
        zz = z.to(torch.float64)
        tt = self._time(t, zz)
        rr = self._time(r, zz)
        dt = tt - rr
        same = dt == 0
        safe_dt = torch.where(same, torch.ones_like(dt), dt)
        u = (zz - self.flow_map(zz, tt, rr)) / safe_dt
        u = torch.where(same, self.velocity(zz, tt), u)
        return u.to(z.dtype)

    def x0_prediction(self, z: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """Exact posterior mean ``E[x | z_t = z] = z - t v(z, t)`` (the "x0-prediction" used by DMD).

        Returns ``z``'s shape and dtype.
        """
        zz = z.to(torch.float64)
        tt = self._time(t, zz)
        return (zz - tt * self.velocity(zz, tt)).to(z.dtype)

    def exact_model(self) -> Callable[..., torch.Tensor]:
        """A callable with the model signature ``model(z, t, r, text) -> u`` returning the exact ``u``.

        The callable takes ``z`` ``[b, f, c, h, w]`` (or ``[b, *shape]``), ``t`` and ``r`` on the
        **0..1000 scale** (float32 ``[b, f]`` or ``[b]`` tensors, or numbers; divided by 1000 in float64),
        and ``text`` (ignored; may be ``None``). It returns :meth:`average_velocity` at ``(t/1000, r/1000)``
        in ``z``'s dtype, so at ``t == r`` it is the exact teacher velocity. Guidance-free: conditional and
        unconditional outputs coincide.
        """

        def model(z: torch.Tensor, t: TimeLike, r: TimeLike, text=None) -> torch.Tensor:
            tt = torch.as_tensor(t, device=z.device).to(torch.float64) / 1000.0
            rr = torch.as_tensor(r, device=z.device).to(torch.float64) / 1000.0
            return self.average_velocity(z, tt, rr)

        return model
