"""AnyFlow-FAR (the causal model) against diffusers' `AnyFlowFARTransformer3DModel` / `AnyFlowFARPipeline`
(float32, CPU): the testable equivalence points E1-E9 of docs/design/far.md 5.1, padding, gradients
and the argument errors.

Tolerance: relative error (Frobenius) < 1e-5, as tests/test_model_equivalence.py: the two float32
implementations differ only in op order (fused vs separate q / k / v, grouped dense attention vs flex with a
block mask), observed 7e-8 - 1.6e-7. Angles (E7) are compared in complex128 (< 1e-12), masks (E8) and the
initialisation (E9) bitwise.

Shapes: the `tiny` preset (4 heads x 16, 2 layers) with chunk partition ``CP = (1, 2, 2, 2, 1)`` (n = 5: the
first 2 chunks compressed in training, up to 2 compressed chunks in the cache). Latents (H, W) = (8, 12)
(full_tpf 24: diffusers pads the sequence to a multiple of 128 and masks the pads, exercising that path)
and (16, 32) (full_tpf 128) wherever diffusers' *generation step* is compared: diffusers pads the step's
q / k / v with zero keys that enter the softmax unless ``cp[k] * full_tpf % 128 == 0`` (docs/design/far.md 7.1), so the
project's exact step is compared with diffusers only there, and with the exact identity (step == training
forward on the clean prefix) at every shape.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel

from megatron_anyflow.models.wan.config import WanConfig, wan_config
from megatron_anyflow.models.wan.convert import hf_to_megatron, load_full_state_dict
from megatron_anyflow.models.wan.far import (FarAttention, FarKVCache, FarLayout, FarModelRunner,
                                             trilinear_far_patch_init)
from megatron_anyflow.models.wan.model import WanModel
from megatron_anyflow.models.wan.rope import rope_angles_at

CP = (1, 2, 2, 2, 1)
HF_KW = dict(num_attention_heads=4, attention_head_dim=16, in_channels=16, out_channels=16, text_dim=384,
             freq_dim=32, ffn_dim=160, num_layers=2)
FAR_KW = dict(compressed_patch_size=(1, 4, 4), full_chunk_limit=3, chunk_partition=CP)
TOL = 1e-5
CPU = torch.device("cpu")


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def randomise_far_parts(module, g):
    """far_patch_embedding and the delta embedder off their initial values, so that a path that skipped
    them (or used the trilinear init / the time embedder instead) is visible."""
    with torch.no_grad():
        for p in [*module.far_patch_embedding.parameters(), *module.condition_embedder.delta_embedder.parameters()]:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    hf = AnyFlowFARTransformer3DModel(**HF_KW, **FAR_KW).eval()
    randomise_far_parts(hf, torch.Generator().manual_seed(10))
    model = WanModel(wan_config("tiny", far=True, chunk_partition=CP)).eval()
    load_full_state_dict(model, hf_to_megatron(hf.state_dict(), 16), "diffusers")
    # the loaded (randomised) far_patch_embedding is used, not the trilinear initialisation
    assert not torch.equal(model.far_patch_embedding.weight, trilinear_far_patch_init(model.patch_embedding.weight))
    return hf, model


def gen(seed):
    return torch.Generator().manual_seed(seed)


def noisy_times(b, f, g):
    """Fresh per-frame (t, r), 0 <= r < t <= 1000 on the model scale, [b, f] each."""
    t = torch.rand(b, f, generator=g) * 900 + 100
    return t, t * torch.rand(b, f, generator=g)


def split(cp, full_chunk_limit=3):
    """(compressed frames, full frames) of a training forward over ``cp``."""
    nf = min(len(cp), full_chunk_limit)
    return sum(cp[:len(cp) - nf]), sum(cp[len(cp) - nf:])


# ------------------------------------------------------------------------------------------ E1 / E2
@pytest.mark.parametrize("hw,n", [((8, 12), 3), ((8, 12), 5), ((16, 32), 5)])
def test_e1_train_without_clean_copies_matches_diffusers(pair, hw, n):
    """E1: training forward (no clean copies), per-frame times on every frame; n <= 3 (all full resolution)
    and n > 3 (the first n - 3 chunks through far_patch_embedding); grouped and dense-mask attention."""
    hf, model = pair
    H, W = hw
    cp = CP[:n]
    fc, ff = split(cp)
    b, f = 2, sum(cp)
    g = gen(100 + n + H)
    x = torch.randn(b, f, 16, H, W, generator=g)
    t, r = noisy_times(b, f, g)
    txt = torch.randn(b, 7, 384, generator=g)
    with torch.no_grad():
        ref = hf(hidden_states=x, timestep=t, r_timestep=r, encoder_hidden_states=txt, chunk_partition=list(cp),
                 return_dict=False)[0]
        out = model(x, t, r, txt, chunk_partition=cp)
        dense = model(x, t, r, txt, chunk_partition=cp, dense_mask=True)
    assert out.shape == ref.shape == (b, ff, 16, H, W)
    assert rel(out, ref) < TOL, rel(out, ref)
    assert rel(dense, ref) < TOL, rel(dense, ref)
    if fc:  # the compressed context matters: changing it changes the output
        x2 = x.clone()
        x2[:, :fc] += 1.0
        with torch.no_grad():
            assert rel(model(x2, t, r, txt, chunk_partition=cp), out) > 1e-4


@pytest.mark.parametrize("n,clean_t", [(3, "zero"), (5, "zero"), (5, "random")])
def test_e2_teacher_forcing_matches_diffusers(pair, n, clean_t):
    """E2: teacher forcing (clean copies of the full-resolution chunks appended, the mask of docs/design/far.md 1.5);
    stage-1 layout (context t = r = 0, one (t, r) per sample on the targets); clean copies at t = 0 and at
    random per-frame times (the clean-copy embedder path)."""
    hf, model = pair
    H, W = 8, 12
    cp = CP[:n]
    fc, ff = split(cp)
    b, f = 2, sum(cp)
    g = gen(200 + n)
    x = torch.randn(b, f, 16, H, W, generator=g)
    clean = torch.randn(b, ff, 16, H, W, generator=g)
    t1, r1 = noisy_times(b, 1, g)
    t = torch.cat([torch.zeros(b, fc), t1.expand(b, ff)], 1)
    r = torch.cat([torch.zeros(b, fc), r1.expand(b, ff)], 1)
    ct = torch.zeros(b, ff) if clean_t == "zero" else torch.rand(b, ff, generator=g) * 300
    txt = torch.randn(b, 7, 384, generator=g)
    with torch.no_grad():
        ref = hf(hidden_states=x, timestep=t, r_timestep=r, encoder_hidden_states=txt, chunk_partition=list(cp),
                 clean_hidden_states=clean, clean_timestep=ct, return_dict=False)[0]
        out = model(x, t, r, txt, chunk_partition=cp, clean_latents=clean, clean_t=ct)
        dense = model(x, t, r, txt, chunk_partition=cp, clean_latents=clean, clean_t=ct, dense_mask=True)
        no_clean = model(x, t, r, txt, chunk_partition=cp)
    assert out.shape == (b, ff, 16, H, W)
    assert rel(out, ref) < TOL, rel(out, ref)
    assert rel(dense, ref) < TOL, rel(dense, ref)
    assert rel(no_clean, out) > 1e-4  # the clean copies are seen


# ------------------------------------------------------------------------------------------ E3 / E4
def diffusers_kv_cache(hf, b, cp, H, W):
    """Zero buffers as AnyFlowFARPipeline allocates them (pipeline_anyflow_far.py step 6)."""
    c = hf.config
    full_tpf, comp_tpf = (H // 2) * (W // 2), (H // 4) * (W // 4)
    return {i: {"full_cache": torch.zeros(2, b, c.num_attention_heads, c.full_chunk_limit * max(cp) * full_tpf,
                                          c.attention_head_dim),
                "compressed_cache": torch.zeros(2, b, c.num_attention_heads,
                                                (len(cp) - c.full_chunk_limit + 1) * max(cp) * comp_tpf,
                                                c.attention_head_dim)}
            for i in range(c.num_layers)}


def compare_cache(hf, kv, cache, cp, H, W):
    """E3: our post-RoPE K and V == diffusers' cached (pre-RoPE) K rotated by diffusers' own RoPE, and V."""
    from diffusers.models.transformers.transformer_anyflow_far import apply_rotary_emb

    lay = FarLayout.prefill(cp, H, W)
    n_comp = sum(s.length for s in lay.segments if s.compressed)
    n_full = lay.valid_length - n_comp
    far_cfg = dict(total_frames=sum(cp), num_compressed_frames=sum(s.frames for s in lay.segments if s.compressed),
                   full_frame_shape=lay.full_grid, compressed_frame_shape=lay.comp_grid)
    freqs = hf.rope(far_cfg=far_cfg, device=CPU)["key"]
    assert cache.chunk_partition == tuple(cp) and cache.num_tokens == lay.valid_length
    errs = []
    for i, (k, v) in enumerate(cache.layers):
        kd, vd = (torch.cat([kv[i]["compressed_cache"][j, :, :, :n_comp], kv[i]["full_cache"][j, :, :, :n_full]], 2)
                  for j in (0, 1))
        errs += [rel(k.permute(1, 2, 0, 3), apply_rotary_emb(kd, freqs)), rel(v.permute(1, 2, 0, 3), vd)]
    assert max(errs) < TOL, errs
    return max(errs)


def test_e3_e4_cache_prefill_and_step_match_diffusers(pair):
    """E3 + E4 at (16, 32) (cp[k] * full_tpf % 128 == 0 for every chunk: diffusers' step is exact there):
    for every chunk k, the generation step against the cache of chunks 0..k-1 == diffusers' inference
    step, and after it the prefill of the clean prefix cp[:k+1] == diffusers' cache (V; K after RoPE)."""
    hf, model = pair
    H, W, b = 16, 32, 2
    g = gen(300)
    video = torch.randn(b, sum(CP), 16, H, W, generator=g)  # the clean history the caches encode
    txt = torch.randn(b, 7, 384, generator=g)
    kv = diffusers_kv_cache(hf, b, CP, H, W)
    flag = {"num_cached_chunks": 0, "is_cache_step": False}
    cache = FarKVCache()
    for k in range(len(CP)):
        cp = CP[:k + 1]
        z = torch.randn(b, cp[-1], 16, H, W, generator=g)
        t1, r1 = noisy_times(b, 1, g)
        t, r = t1.expand(b, cp[-1]), r1.expand(b, cp[-1])
        with torch.no_grad():
            ref = hf(hidden_states=z, timestep=t, r_timestep=r, encoder_hidden_states=txt, chunk_partition=list(cp),
                     kv_cache=kv, kv_cache_flag=copy.deepcopy(flag), return_dict=False)[0]
            out = model(z, t, r, txt, chunk_partition=cp, kv_cache=cache)
        assert rel(out, ref) < TOL, (k, rel(out, ref))
        if k == len(CP) - 1:
            break
        prefix = video[:, :sum(cp)]
        zeros = torch.zeros(b, sum(cp))
        mask = hf.build_attention_mask(chunk_partition=list(cp), height=H, width=W, mode="cache")
        with torch.no_grad():
            hf(hidden_states=prefix, timestep=zeros, r_timestep=zeros, encoder_hidden_states=txt,
               chunk_partition=list(cp), kv_cache=kv, kv_cache_flag={"num_cached_chunks": k, "is_cache_step": True},
               attention_mask=mask, return_dict=False)
        flag["num_cached_chunks"] += 1
        cache = model.prefill(prefix, txt, cp)
        compare_cache(hf, kv, cache, cp, H, W)


def test_e4_step_equals_train_forward_on_clean_prefix(pair):
    """The exact identity behind the cache (docs/design/far.md 1.6 (a)), at every k incl. the padded-size (8, 12):
    step(chunk k | prefill(cp[:k])) == training forward (no clean copies) on cat(clean history, chunk k)
    with times [0 .. 0, t .. t], its last cp[k] frames. And (1.6 b): the last noisy chunk of a teacher-forcing
    forward == the step of that chunk given the same clean history."""
    _, model = pair
    H, W, b = 8, 12, 2
    g = gen(400)
    video = torch.randn(b, sum(CP), 16, H, W, generator=g)
    txt = torch.randn(b, 7, 384, generator=g)
    errs = []
    for k in range(len(CP)):
        cp = CP[:k + 1]
        s = sum(cp[:-1])
        z = torch.randn(b, cp[-1], 16, H, W, generator=g)
        t1, r1 = noisy_times(b, 1, g)
        cache = model.prefill(video[:, :s], txt, cp[:-1]) if k else FarKVCache()
        T = torch.cat([torch.zeros(b, s), t1.expand(b, cp[-1])], 1)
        R = torch.cat([torch.zeros(b, s), r1.expand(b, cp[-1])], 1)
        with torch.no_grad():
            step = model(z, T[:, s:], R[:, s:], txt, chunk_partition=cp, kv_cache=cache)
            train = model(torch.cat([video[:, :s], z], 1), T, R, txt, chunk_partition=cp)[:, -cp[-1]:]
        errs.append(rel(step, train))
        if k >= 2:  # teacher forcing over cp: clean copies of the full chunks = the clean history (+ any for k)
            fc, ff = split(cp)
            x = torch.cat([video[:, :fc], torch.randn(b, ff - cp[-1], 16, H, W, generator=g), z], 1)
            clean = torch.cat([video[:, fc:s], torch.randn(b, cp[-1], 16, H, W, generator=g)], 1)
            Tt = torch.cat([torch.zeros(b, fc), t1.expand(b, ff)], 1)
            Rt = torch.cat([torch.zeros(b, fc), r1.expand(b, ff)], 1)
            with torch.no_grad():
                tf = model(x, Tt, Rt, txt, chunk_partition=cp, clean_latents=clean)[:, -cp[-1]:]
            errs.append(rel(step, tf))
    assert max(errs) < TOL, errs


# ------------------------------------------------------------------------------------------ E5
@pytest.fixture(scope="module")
def far_pipeline(pair):
    from diffusers import AnyFlowFARPipeline, FlowMapEulerDiscreteScheduler

    pipe = AnyFlowFARPipeline(tokenizer=None, text_encoder=None, transformer=pair[0], vae=None,
                              scheduler=FlowMapEulerDiscreteScheduler(shift=5.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# The pipeline's partition (passed to the call; the transformer's default is CP): 4 chunks, so the cache
# holds a compressed chunk from chunk 3 on and the prefill of cp[:3] compresses chunk 0; chunk 1 has 2
# frames. diffusers' pipeline costs ~0.5 s per forward on CPU (flex_attention's eager path), hence the
# short partition and 4 of the 6 (N, condition) pairs: every N and every condition kind once.
PIPE_CP = (1, 2, 1, 1)


@pytest.mark.parametrize("num_steps,cond_frames", [(1, 0), (3, 0), (1, 1), (3, 3)])
def test_e5_pipeline_equals_chunked_sampler(pair, far_pipeline, num_steps, cond_frames):
    """E5: AnyFlowFARPipeline (use_kv_cache, output_type="latent") == anyflow.causal.sample_chunked over
    FarModelRunner, T2V / I2V (T = 1: chunk 0) / V2V (T = 3: chunks 0, 1), N in {1, 3}, at (16, 32)."""
    from megatron_anyflow.anyflow.causal import sample_chunked

    _, model = pair
    H, W, b, f = 16, 32, 1, sum(PIPE_CP)
    g = gen(500 + 10 * num_steps + cond_frames)
    noise = torch.randn(b, 16, f, H, W, generator=g)  # diffusers layout [b, c, F, h, w]
    pe = torch.randn(b, 7, 384, generator=g)
    cond = torch.randn(b, cond_frames, 16, H, W, generator=g) if cond_frames else None
    ref = far_pipeline(prompt_embeds=pe, latents=noise.clone(), video_latents=cond, height=8 * H, width=8 * W,
                       num_frames=4 * (f - 1) + 1, num_inference_steps=num_steps, chunk_partition=list(PIPE_CP),
                       output_type="latent", return_dict=False)[0]
    out = sample_chunked(FarModelRunner(model), noise.permute(0, 2, 1, 3, 4).contiguous(), pe, PIPE_CP, num_steps,
                         shift=5.0, condition=cond)
    out = out.permute(0, 2, 1, 3, 4)
    assert out.shape == ref.shape == noise.shape
    assert rel(out, ref) < TOL, rel(out, ref)
    if cond is not None:
        assert torch.equal(out[:, :, :cond_frames], cond.permute(0, 2, 1, 3, 4))


# ------------------------------------------------------------------------------------------ E6
def test_e6_bidirectional_mode_and_single_chunk(pair):
    """E6: the FAR model without chunk_partition == diffusers' AnyFlowTransformer3DModel holding the FAR
    state dict minus far_patch_embedding.* (the reference's bidirectional forward; diffusers' FAR class has
    none); and a single chunk cp = [F] (all full resolution, no mask) == the same."""
    hf, model = pair
    bi = AnyFlowTransformer3DModel(**HF_KW).eval()
    missing, unexpected = bi.load_state_dict(
        {k: v for k, v in hf.state_dict().items() if not k.startswith("far_patch_embedding.")}, strict=True)
    assert not missing and not unexpected
    g = gen(600)
    b, f, H, W = 2, 5, 8, 12
    x = torch.randn(b, f, 16, H, W, generator=g)
    t, r = noisy_times(b, f, g)
    txt = torch.randn(b, 7, 384, generator=g)
    with torch.no_grad():
        ref = bi(x, t, r, txt, return_dict=False)[0]
        bidir = model(x, t, r, txt)
        single = model(x, t, r, txt, chunk_partition=[f])
        hf_single = hf(hidden_states=x, timestep=t, r_timestep=r, encoder_hidden_states=txt, chunk_partition=[f],
                       return_dict=False)[0]
    for name, out in (("bidirectional", bidir), ("cp=[F]", single), ("diffusers FAR cp=[F]", hf_single)):
        assert rel(out, ref) < TOL, (name, rel(out, ref))


# ------------------------------------------------------------------------------------------ E7
def _rope_split(head_dim):
    from types import SimpleNamespace

    return WanConfig.rope_split.fget(SimpleNamespace(head_dim=head_dim))


@pytest.mark.parametrize("head_dim,hw,cp", [(16, (8, 12), CP), (128, (60, 104), (1, 3, 3, 3, 2))])
def test_e7_rope_of_compressed_tokens(head_dim, hw, cp):
    """E7: the fractional-position angles of every layout (compressed tokens at (f, 2j + 0.5, 2i + 0.5))
    == diffusers' average-pooled, renormalised complex RoPE, in complex128: the compressed grid against
    ``rope._forward_compressed_frame`` directly, and whole train (with / without clean copies), prefill and
    step layouts against ``rope.forward`` (inference: the query rows). Also at the real head_dim 128 and
    480p latents (60 x 104)."""
    from diffusers.models.transformers.transformer_anyflow_far import AnyFlowCausalRotaryPosEmbed

    H, W = hw
    rope = AnyFlowCausalRotaryPosEmbed(head_dim, (1, 2, 2), (1, 4, 4), 1024)
    split_ = _rope_split(head_dim)

    def ours(lay):
        a = rope_angles_at(lay.rope_positions(), split_, 10000.0)
        return torch.polar(torch.ones_like(a), a)

    def cfg(lay, total):
        return dict(total_frames=total, num_compressed_frames=sum(s.frames for s in lay.segments if s.compressed),
                    full_frame_shape=lay.full_grid, compressed_frame_shape=lay.comp_grid)

    errs = {}
    lay = FarLayout.train(cp, H, W)
    fc = sum(s.frames for s in lay.segments if s.compressed)
    assert fc > 0
    comp = rope._forward_compressed_frame(sum(cp), H // 4, W // 4, CPU)[:fc].reshape(-1, head_dim // 2)
    assert comp.dtype == torch.complex128
    n_comp = comp.shape[0]
    errs["compressed"] = (ours(lay)[:n_comp] - comp).abs().max().item()
    for clean in (False, True):
        lay = FarLayout.train(cp, H, W, clean=clean)
        ref = rope(cfg(lay, sum(cp)), CPU, clean_hidden_states=torch.empty(0) if clean else None)["query"][0, 0]
        errs[f"train clean={clean}"] = (ours(lay) - ref).abs().max().item()
    for j in range(len(cp) - 1):
        lay = FarLayout.prefill(cp[:j + 1], H, W)
        ref = rope(cfg(lay, sum(cp[:j + 1])), CPU)["key"][0, 0]
        errs[f"prefill {j}"] = (ours(lay) - ref).abs().max().item()
    for k in range(1, len(cp)):
        lay = FarLayout.step(cp[:k + 1], H, W)
        full_lay = FarLayout.train(cp[:k + 1], H, W)  # diffusers' inference rope is the train rope's tail
        ref = rope(cfg(full_lay, sum(cp[:k + 1])), CPU)["query"][0, 0][-lay.length:]
        errs[f"step {k}"] = (ours(lay) - ref).abs().max().item()
    assert max(errs.values()) < 1e-12, errs


# ------------------------------------------------------------------------------------------ E8
def _diffusers_mask(cp, H, W, mode, clean, full_chunk_limit=3):
    from diffusers.models.transformers.transformer_anyflow_far import _build_anyflow_far_causal_block_mask

    bm = _build_anyflow_far_causal_block_mask(list(cp), H, W, (1, 2, 2), (1, 4, 4), full_chunk_limit, mode=mode,
                                              has_clean_context=clean, device=CPU)
    L = bm.seq_lengths[0]
    idx = torch.arange(L)
    return bm, bm.mask_mod(None, None, idx[:, None], idx[None, :])


def _padded(mask, L):
    out = torch.zeros(L, L, dtype=torch.bool)
    out[:mask.shape[0], :mask.shape[1]] = mask
    return out


@pytest.mark.parametrize("cp", [CP, (2, 1, 3, 1), (3,)])
@pytest.mark.parametrize("mode,clean", [("train", False), ("train", True), ("cache", False), ("cache", True)])
def test_e8_dense_mask_matches_diffusers_mask_mod(cp, mode, clean):
    """E8: FarLayout.dense_mask == diffusers' build_attention_mask(...).mask_mod on the index grid (its
    128-padding rows / columns all False). train: FarLayout.train (with / without clean copies). cache:
    FarLayout.prefill (the project's prefill takes no clean copies, nor does the pipeline's); diffusers'
    cache mode *with* clean copies differs from its train mode only by the threshold (full_chunk_limit - 1),
    i.e. FarLayout.train(full_chunk_limit=2, clean=True)."""
    H, W = 8, 12
    _, ref = _diffusers_mask(cp, H, W, mode, clean)
    if mode == "train":
        lays = [FarLayout.train(cp, H, W, clean=clean)]
    else:
        lays = [FarLayout.train(cp, H, W, full_chunk_limit=2, clean=clean)]
        if not clean:
            lays.append(FarLayout.prefill(cp, H, W))
    for lay in lays:
        ours = lay.dense_mask()
        assert ours.shape[0] <= ref.shape[0]
        padded = _padded(ours, ref.shape[0])
        assert torch.equal(padded, ref), (lay.mode, int((padded != ref).sum()))
        # grouped attention covers exactly the mask: every allowed pair in one group's key ranges
        cover = torch.zeros_like(ours)
        for q0, q1, ranges in lay.attention_groups():
            for a, e in ranges:
                assert not cover[q0:q1, a:e].any()  # disjoint ranges
                cover[q0:q1, a:e] = True
        assert torch.equal(cover, ours)


def _sdpa_core(q, k, v):
    """A dense core attention: q [sq, b, n, d], k / v [sk, b, n, d] -> [sq, b, n * d]."""
    out = F.scaled_dot_product_attention(*(x.permute(1, 2, 0, 3) for x in (q, k, v)))
    return out.permute(2, 0, 1, 3).reshape(q.shape[0], q.shape[1], -1)


def _qkv(L, g, b=2, n=4, d=16):
    return [torch.randn(L, b, n, d, generator=g) for _ in range(3)]


@pytest.mark.parametrize("cp,clean", [(CP, True), (CP, False), ((2, 1, 3, 1), True)])
def test_e8_grouped_attention_equals_dense_mask_and_flex(cp, clean):
    """E8: FarAttention's grouped attention == one masked SDPA over the dense mask == flex_attention with
    diffusers' BlockMask (q / k / v zero-padded to its 128 multiple), on random q, k, v."""
    H, W = 8, 12
    lay = FarLayout.train(cp, H, W, clean=clean)
    L = lay.length
    q, k, v = _qkv(L, gen(800 + len(cp)))
    grouped = FarAttention(lay).attend(_sdpa_core, q, k, v, 0)
    dense = FarAttention(lay, dense_mask=True).attend(_sdpa_core, q, k, v, 0)
    assert rel(grouped, dense) < TOL, rel(grouped, dense)
    bm, _ = _diffusers_mask(cp, H, W, "train", clean)
    Lp = bm.seq_lengths[0]
    try:
        from torch.nn.attention.flex_attention import flex_attention

        qp, kp, vp = (F.pad(x.permute(1, 2, 0, 3), (0, 0, 0, Lp - L)) for x in (q, k, v))
        flex = flex_attention(qp, kp, vp, block_mask=bm)
    except (RuntimeError, NotImplementedError, ImportError) as err:  # pragma: no cover - torch build without it
        pytest.skip(f"flex_attention does not run on CPU eager in this torch build: {type(err).__name__}: {err}")
    flex = flex[:, :, :L].permute(2, 0, 1, 3).reshape(L, q.shape[1], -1)
    assert rel(grouped, flex) < TOL, rel(grouped, flex)


# ------------------------------------------------------------------------------------------ E9
def test_e9_far_patch_embedding_init_is_trilinear_like_diffusers():
    """E9: a new FAR model's far_patch_embedding == trilinear interpolation of patch_embedding (bitwise,
    computed here independently), bias copied; reset_far_patch_embedding from diffusers' patch_embedding
    reproduces diffusers' own initialisation bitwise; a bidirectional model refuses the reset."""
    torch.manual_seed(3)
    model = WanModel(wan_config("tiny", far=True, chunk_partition=CP))
    w = model.patch_embedding.weight
    expect = F.interpolate(w.detach().reshape(-1, 1, 1, 2, 2), size=(1, 4, 4), mode="trilinear",
                           align_corners=False).reshape(w.shape[0], w.shape[1], 1, 4, 4)
    assert model.far_patch_embedding.weight.shape == (64, 16, 1, 4, 4)
    assert torch.equal(model.far_patch_embedding.weight, expect)
    assert torch.equal(model.far_patch_embedding.bias, model.patch_embedding.bias)
    assert not torch.equal(model.far_patch_embedding.weight[..., :2, :2], w)  # interpolated, not copied

    hf = AnyFlowFARTransformer3DModel(**HF_KW, **FAR_KW)
    with torch.no_grad():
        model.patch_embedding.weight.copy_(hf.patch_embedding.weight)
        model.patch_embedding.bias.copy_(hf.patch_embedding.bias)
        model.far_patch_embedding.weight.normal_()
    model.reset_far_patch_embedding()
    assert torch.equal(model.far_patch_embedding.weight, hf.far_patch_embedding.weight)
    assert torch.equal(model.far_patch_embedding.bias, hf.far_patch_embedding.bias)
    with pytest.raises(ValueError, match="far=False"):
        WanModel(wan_config("tiny")).reset_far_patch_embedding()


# ------------------------------------------------------------------------------------------ padding
@pytest.mark.parametrize("pad_to", [4, 7])
@pytest.mark.parametrize("mode", ["train", "train-clean", "prefill"])
def test_padded_layout_attention_equals_unpadded(mode, pad_to):
    """A layout padded to a multiple of pad_to (CP x SP) gives the same attention outputs on the real
    tokens (bitwise: the same groups on the same data), zeros on the pads, whatever the pads hold (they are
    never keys); RoPE positions and modulation runs agree on the real tokens."""
    H, W = 8, 12
    build = {"train": lambda p: FarLayout.train(CP, H, W, pad_to=p),
             "train-clean": lambda p: FarLayout.train(CP, H, W, clean=True, pad_to=p),
             "prefill": lambda p: FarLayout.prefill(CP[:4], H, W, pad_to=p)}[mode]
    lay, padded = build(1), build(pad_to)
    L, Lp = lay.length, padded.length
    assert Lp % pad_to == 0 and Lp > L and padded.valid_length == L
    q, k, v = _qkv(Lp, gen(900 + pad_to))
    for dense in (False, True):
        a = FarAttention(lay, dense_mask=dense)
        ap = FarAttention(padded, dense_mask=dense)
        out = a.attend(_sdpa_core, q[:L], k[:L], v[:L], 0)
        outp = ap.attend(_sdpa_core, q, k, v, 0)
        assert outp.shape[0] == Lp
        assert torch.equal(outp[:L], out) if not dense else rel(outp[:L], out) < 1e-6
        assert not outp[L:].any()
        if mode == "prefill":
            assert all(torch.equal(x, y) for x, y in zip(ap.written[0], a.written[0]))  # pads never cached
    assert torch.equal(padded.rope_positions()[:L], lay.rope_positions())
    assert padded.frame_runs()[:-1] == lay.frame_runs() and padded.frame_runs()[-1] == (0, Lp - L)
    if mode != "prefill":  # a prefill has no output
        assert padded.output_range == lay.output_range


def _force_padding(monkeypatch, multiple):
    """Make every FarLayout the model builds padded to ``multiple`` (what CP x SP = pad_to does), in one
    process: the model's own padding path (embeddings, modulation runs, RoPE, attention, cache, output)."""
    for name in ("train", "prefill", "step"):
        orig = getattr(FarLayout, name)

        def padded(cls, *args, _orig=orig, pad_to=1, **kwargs):
            return _orig(*args, pad_to=multiple, **kwargs)

        monkeypatch.setattr(FarLayout, name, classmethod(padded))


def test_padded_model_forward_equals_unpadded(pair, monkeypatch):
    """The whole model with every layout padded (to 7) == unpadded: teacher forcing (forward and the
    parameter gradients), prefill (cache) and the cached step, at (8, 12)."""
    _, model = pair
    H, W, b = 8, 12, 2
    g = gen(950)
    fc, ff = split(CP)
    x = torch.randn(b, sum(CP), 16, H, W, generator=g)
    clean = torch.randn(b, ff, 16, H, W, generator=g)
    t, r = noisy_times(b, sum(CP), g)
    txt = torch.randn(b, 7, 384, generator=g)
    z = torch.randn(b, CP[-1], 16, H, W, generator=g)
    w = torch.randn(b, ff, 16, H, W, generator=g)

    def run():
        model.zero_grad(set_to_none=True)
        tf = model(x, t, r, txt, chunk_partition=CP, clean_latents=clean)
        (tf * w).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            cache = model.prefill(x[:, :sum(CP[:-1])], txt, CP[:-1])
            step = model(z, t[:, -1:], r[:, -1:], txt, chunk_partition=CP, kv_cache=cache)
        return tf.detach(), grads, cache, step

    ref = run()
    _force_padding(monkeypatch, 7)
    assert FarLayout.train(CP, H, W).pad > 0 and FarLayout.prefill(CP[:-1], H, W).pad > 0
    out = run()
    for i in (0, 1, 3):
        assert rel(out[i], ref[i]) < 1e-6, (i, rel(out[i], ref[i]))
    assert out[2].num_tokens == ref[2].num_tokens
    assert max(rel(a, b) for la, lb in zip(out[2].layers, ref[2].layers) for a, b in zip(la, lb)) < 1e-6


# ------------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("n", [3, 5])
def test_training_backward_and_far_patch_gradient(n):
    """Teacher-forcing forward + backward: finite gradients everywhere used; far_patch_embedding gets a
    gradient only when some chunk is compressed (n > 3); the grouped and dense-mask backward agree."""
    torch.manual_seed(7)
    model = WanModel(wan_config("tiny", far=True, chunk_partition=CP))
    randomise_far_parts(model, gen(70))
    H, W, b = 8, 12, 2
    cp = CP[:n]
    fc, ff = split(cp)
    g = gen(700 + n)
    x = torch.randn(b, sum(cp), 16, H, W, generator=g, requires_grad=True)
    clean = torch.randn(b, ff, 16, H, W, generator=g)
    t1, r1 = noisy_times(b, 1, g)
    t = torch.cat([torch.zeros(b, fc), t1.expand(b, ff)], 1)
    r = torch.cat([torch.zeros(b, fc), r1.expand(b, ff)], 1)
    txt = torch.randn(b, 7, 384, generator=g)
    w = torch.randn(b, ff, 16, H, W, generator=g)

    grads = []
    for dense in (False, True):
        model.zero_grad(set_to_none=True)
        x.grad = None
        (model(x, t, r, txt, chunk_partition=cp, clean_latents=clean, dense_mask=dense) * w).sum().backward()
        gp = {k: p.grad for k, p in model.named_parameters()}
        for k, gr in gp.items():
            assert gr is None or bool(torch.isfinite(gr).all()), k
        far_grad = gp["far_patch_embedding.weight"]
        if n > 3:
            assert far_grad is not None and far_grad.abs().sum() > 0
            assert x.grad[:, :fc].abs().sum() > 0
        else:
            assert far_grad is None or not far_grad.any()
        for k in ("patch_embedding.weight", "blocks.0.self_attention.linear_qkv.weight", "proj_out.weight",
                  "condition_embedder.delta_embedder.linear_1.weight"):
            assert gp[k] is not None and gp[k].abs().sum() > 0, k
        grads.append({k: v.clone() for k, v in gp.items() if v is not None})
        grads[-1]["x"] = x.grad.clone()
    assert grads[0].keys() == grads[1].keys()
    worst = max(rel(grads[0][k], grads[1][k]) for k in grads[0] if grads[1][k].norm() > 0)
    assert worst < TOL, worst


# ------------------------------------------------------------------------------------------ errors
def test_errors_name_the_value(pair):
    _, model = pair
    H, W, b = 8, 12, 1
    g = gen(990)
    x = torch.randn(b, sum(CP), 16, H, W, generator=g)
    t = torch.rand(b, generator=g) * 1000
    txt = torch.randn(b, 7, 384, generator=g)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"latents have 7 frames; chunk_partition=\[1, 2, 2, 2, 1\] sums to 8"):
            model(x[:, :7], t, t, txt, chunk_partition=CP)
        with pytest.raises(ValueError, match=r"chunk_partition=\[1, 0, 7\]"):
            model(x, t, t, txt, chunk_partition=[1, 0, 7])
        cache = model.prefill(x[:, :3], txt, CP[:2])
        with pytest.raises(ValueError, match=r"holds chunks \[1, 2\].*needs \[1, 2, 2\]"):
            model(x[:, :2], t, t, txt, chunk_partition=CP[:4], kv_cache=cache)
        with pytest.raises(ValueError, match=r"takes the current chunk only: 2 frames, got 1"):
            model(x[:, :1], t, t, txt, chunk_partition=CP[:3], kv_cache=cache)
        with pytest.raises(ValueError, match=r"built for latents 8x12; got 16x12"):
            model(torch.randn(b, 2, 16, 16, 12, generator=g), t, t, txt, chunk_partition=CP[:3], kv_cache=cache)
        with pytest.raises(ValueError, match="kv_cache must be a FarKVCache"):
            model(x[:, :2], t, t, txt, chunk_partition=CP[:3], kv_cache={0: {}})
        with pytest.raises(ValueError, match=r"clean_latents must be .*\[1, 5, 16, 8, 12\]; got \(1, 4, 16, 8, 12\)"):
            model(x, t, t, txt, chunk_partition=CP, clean_latents=x[:, :4])
        with pytest.raises(ValueError, match=r"8 x 10 must divide by the compressed patch"):
            model(torch.randn(b, 8, 16, 8, 10, generator=g), t, t, txt, chunk_partition=CP)
        with pytest.raises(ValueError, match="pass chunk_partition"):
            model(x, t, t, txt, clean_latents=x)
        bidirectional = WanModel(wan_config("tiny")).eval()
        with pytest.raises(ValueError, match=r"chunk_partition=\[1, 2, 2, 2, 1\] given to a bidirectional model \(WanConfig.far=False\)"):
            bidirectional(x, t, t, txt, chunk_partition=CP)
    with pytest.raises(ValueError, match="FarModelRunner needs a FAR model"):
        FarModelRunner(bidirectional)
    # a generation step takes the current chunk only: teacher-forcing inputs are refused, not ignored
    with torch.no_grad():
        cache = model.prefill(x[:, :3], txt, CP[:2])
        with pytest.raises(ValueError, match="clean_latents / clean_t are teacher-forcing inputs"):
            model(x[:, 3:5], t, t, txt, chunk_partition=CP[:3], kv_cache=cache,
                  clean_latents=x[:, 3:5])
    with pytest.raises(ValueError, match="'prefill' layout has no output frames"):
        FarLayout.prefill(CP[:3], 8, 12).output_range
