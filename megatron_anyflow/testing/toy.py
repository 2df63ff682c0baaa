"""A tiny flow-map network for tests: ``model(z, t, r, text) -> u`` on a small latent.

:class:`ToyFlowMapNet` is parameterised as

    u(z, t, r) = a(t, r) * z + sum_k c_k(t, r) B_k + MLP([z, features(t, r)]),

per sample and latent frame, where ``a`` (one scalar per frame) and ``c`` (``K`` coefficients per frame) are
small MLPs of Fourier features of ``(t, r)``, ``B`` is a learned basis ``[K, f, c*h*w]`` and the last MLP is
a residual correction over the flattened latent (zero-initialised). For Gaussian data
``x ~ N(mu, s^2 I)`` the exact average velocity is ``a(t, r) z + c(t, r) mu`` with scalar ``a`` and ``c``
(see :mod:`megatron_anyflow.anyflow.gaussian`), so the first two terms can represent it exactly.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

__all__ = ["ToyFlowMapNet"]


def _mlp(d_in: int, hidden: int, d_out: int, zero_last: bool = False) -> nn.Sequential:
    last = nn.Linear(hidden, d_out)
    if zero_last:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), last)


class ToyFlowMapNet(nn.Module):
    """Tiny MLP flow-map network with the AnyFlow model signature.

    Args:
        latent_shape: per-sample latent shape ``(f, c, h, w)``.
        hidden: width of the MLPs (128).
        n_freq: number of Fourier frequencies ``k = 1..n_freq`` in the time features
            ``[t, r, t - r, sin(pi k t), cos(pi k t), sin(pi k r), cos(pi k r)]`` (t, r in [0, 1]); default 1.
            Higher frequencies make the stop-gradient MeanFlow bootstrap of stage 1 noisier (observed on
            the Gaussian problem of tests/test_gaussian_stage1.py, trained without the teacher phase:
            1-step errors about 2x larger at n_freq = 6).
        num_basis: ``K``, number of learned bias basis vectors (4).
        use_text: if True, the mean of the text embedding (one scalar per sample) is appended to the time
            features, so conditional and null outputs differ; default False (text ignored).
        correction: include the residual MLP over ``[z, features]`` (True). Without it the network is
            exactly the affine family ``a(t, r) z + c(t, r) . B`` (enough for Gaussian data, and less
            noisy to train).

    Call: ``model(z, t, r, text)`` with ``z`` ``[b, f, c, h, w]``, ``t, r`` ``[b, f]`` (or ``[b]``) on the
    **0..1000 scale** (any float dtype; divided by 1000 in the parameters' dtype), ``text`` ``[b, L, d]``
    or None. Returns ``u`` with ``z``'s shape and dtype (computed in the parameters' dtype).

    Raises:
        ValueError: ``latent_shape`` is not 4 positive ints; at call time, ``z`` / ``t`` / ``r`` of the
            wrong shape, or ``use_text`` without ``text``.
    """

    def __init__(self, latent_shape: Sequence[int], hidden: int = 128, n_freq: int = 1, num_basis: int = 4,
                 use_text: bool = False, correction: bool = True):
        super().__init__()
        latent_shape = tuple(int(d) for d in latent_shape)
        if len(latent_shape) != 4 or min(latent_shape) < 1:
            raise ValueError(f"latent_shape must be (f, c, h, w) of positive ints, got {latent_shape}")
        self.latent_shape = latent_shape
        self.frames = latent_shape[0]
        self.frame_dim = latent_shape[1] * latent_shape[2] * latent_shape[3]
        self.n_freq = int(n_freq)
        self.use_text = bool(use_text)
        self.feat_dim = 3 + 4 * self.n_freq + (1 if self.use_text else 0)
        self.a_net = _mlp(self.feat_dim, hidden, 1)
        self.c_net = _mlp(self.feat_dim, hidden, num_basis)
        self.basis = nn.Parameter(0.1 * torch.randn(num_basis, self.frames, self.frame_dim))
        d = self.frames * self.frame_dim
        self.corr_net = _mlp(d + self.frames * self.feat_dim, hidden, d, zero_last=True) if correction else None

    def features(self, t: torch.Tensor, r: torch.Tensor, text: Optional[torch.Tensor]) -> torch.Tensor:
        """Time (and text) features ``[b, f, feat_dim]`` in the parameters' dtype."""
        dtype = self.basis.dtype
        tt = t.to(dtype) / 1000.0
        rr = r.to(dtype) / 1000.0
        k = torch.arange(1, self.n_freq + 1, dtype=dtype, device=tt.device) * math.pi
        ang_t, ang_r = tt[..., None] * k, rr[..., None] * k
        feats = [tt[..., None], rr[..., None], (tt - rr)[..., None],
                 ang_t.sin(), ang_t.cos(), ang_r.sin(), ang_r.cos()]
        if self.use_text:
            if text is None:
                raise ValueError("use_text=True needs a text tensor [b, L, d]")
            m = text.to(dtype).mean(dim=(1, 2))[:, None, None].expand(*tt.shape, 1)
            feats.append(m)
        return torch.cat(feats, dim=-1)

    def forward(self, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                text: Optional[torch.Tensor] = None) -> torch.Tensor:
        if z.dim() != 5 or tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"z must be [b, {', '.join(map(str, self.latent_shape))}], got {tuple(z.shape)}")
        b, f = z.shape[:2]
        t = torch.as_tensor(t, device=z.device)
        r = torch.as_tensor(r, device=z.device)
        if t.dim() == 1:
            t = t[:, None].expand(b, f)
        if r.dim() == 1:
            r = r[:, None].expand(b, f)
        if tuple(t.shape) != (b, f) or tuple(r.shape) != (b, f):
            raise ValueError(f"t and r must be [b, f] = {(b, f)} (or [b]), got {tuple(t.shape)}, {tuple(r.shape)}")
        dtype = self.basis.dtype
        feats = self.features(t, r, text)  # [b, f, F]
        zz = z.to(dtype).reshape(b, f, self.frame_dim)
        a = self.a_net(feats)  # [b, f, 1]
        coef = self.c_net(feats)  # [b, f, K]
        bias = torch.einsum("bfk,kfm->bfm", coef, self.basis)
        u = a * zz + bias
        if self.corr_net is not None:
            u = u + self.corr_net(torch.cat([zz.reshape(b, -1), feats.reshape(b, -1)], dim=-1)).reshape(b, f, -1)
        return u.reshape(z.shape).to(z.dtype)
