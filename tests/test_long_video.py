"""The compiled diffusion-forcing row loop and the window-by-window rollout.

The row loop is checked against a re-statement of the diffusers pipeline loop (one diffusers UniPC instance per
frame, stepped only where the update mask says, on the row's window) with an analytic velocity model.
"""

import copy
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler

from cinema_jax import config as config_lib
from cinema_jax.diffusion import forcing, unipc
from cinema_jax.models import video_dit
from cinema_jax.pipelines import long_video
from tests.test_forcing import diffusers_timestep_matrix


def velocity_np(x, t, ctx_mean):
  t = np.asarray(t, np.float64).reshape(t.shape + (1,) * (x.ndim - t.ndim))
  c = np.asarray(ctx_mean).reshape((-1,) + (1,) * (x.ndim - 1))
  return (np.cos(t / 300.0) * x + 0.5 * np.sin(3.0 * x) + t / 1000.0 + c).astype(np.float32)


def velocity_jax(variables, x, t, ctx):
  t = t.reshape(t.shape + (1,) * (x.ndim - t.ndim))
  c = jnp.mean(ctx, axis=(1, 2)).reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.cos(t / 300.0) * x + 0.5 * jnp.sin(3.0 * x) + t / 1000.0 + c


def pipeline_loop(latents, num_steps, shift, base, ar, pre, cbs, ctx_mean, neg_mean=None, guidance=1.0):
  """The diffusers DF pipeline's row loop (sample .clone()d: diffusers' pipeline aliases the first corrector's
  stored sample with the latents it overwrites; the scheduler's own math is what we follow)."""
  scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
  scheduler.set_timesteps(num_steps)
  frames = latents.shape[1]
  per_frame = [copy.deepcopy(scheduler) for _ in range(frames)]
  steps, _, update, interval = diffusers_timestep_matrix()(frames, scheduler.timesteps, base, ar, pre, cbs)
  x = latents.copy()
  for i, t in enumerate(steps):
    a, b = interval[i]
    t_win = np.broadcast_to(t[a:b].numpy()[None], (x.shape[0], b - a))
    v = velocity_np(x[:, a:b], t_win, ctx_mean)
    if guidance > 1:
      vu = velocity_np(x[:, a:b], t_win, neg_mean)
      v = vu + guidance * (v - vu)
    for f in range(a, b):
      if update[i, f]:
        x[:, f] = per_frame[f].step(torch.from_numpy(v[:, f - a]), t[f], torch.from_numpy(x[:, f].copy()))[0].numpy()
  return x


@pytest.mark.parametrize(
  "frames,steps,shift,base,ar,pre,cbs,guidance",
  [
    (8, 6, 8.0, 8, 0, 0, 1, 1.0),  # synchronous
    (10, 6, 5.0, 10, 2, 2, 1, 3.0),  # asynchronous with a clean prefix, CFG
    (20, 8, 8.0, 10, 5, 5, 5, 1.0),  # blocks of 5, windows of 10 frames sliding over 20
  ],
)
def test_row_loop_matches_the_pipeline_loop(frames, steps, shift, base, ar, pre, cbs, guidance):
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((2, frames, 3, 2)).astype(np.float32)
  ctx = rng.standard_normal((2, 4, 3)).astype(np.float32)
  neg = rng.standard_normal((2, 4, 3)).astype(np.float32)
  ref = pipeline_loop(latents, steps, shift, base, ar, pre, cbs, ctx.mean((1, 2)), neg.mean((1, 2)), guidance)
  solver = unipc.FlowUniPC.create(steps, shift)
  plan = forcing.ForcingPlan.create(
    frames, solver.timesteps, base_num_frames=base, ar_step=ar, num_prefix=pre, causal_block_size=cbs
  )
  assert plan.window == min(base, frames)
  fn = jax.jit(forcing.make_denoiser(velocity_jax, plan, solver, guidance_scale=guidance))
  out = fn({}, jnp.asarray(latents), jnp.asarray(ctx), jnp.asarray(neg), jax.random.key(0))
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(np.asarray(out)[:, :pre], latents[:, :pre])  # the prefix is never updated


def test_cfg_by_hand_with_euler():
  """A model that returns a constant per context: Euler from sigma_0 to 0 moves x by -sigma_0 (v_u + g (v_c - v_u))."""
  solver = unipc.FlowEuler.create(5, 3.0)
  plan = forcing.ForcingPlan.create(3, solver.timesteps)

  def constant(variables, x, t, ctx):
    return jnp.broadcast_to(ctx[:, :1, :1, None, None], x.shape) + 0 * t[..., None, None, None]

  fn = forcing.make_denoiser(constant, plan, solver, guidance_scale=4.0)
  x = jnp.zeros((1, 3, 2, 2, 1))
  out = fn({}, x, jnp.full((1, 1, 1), 2.0), jnp.full((1, 1, 1), 0.5), jax.random.key(0))
  v_eff = 0.5 + 4.0 * (2.0 - 0.5)
  np.testing.assert_allclose(out, -solver.sigmas[0] * v_eff, rtol=1e-5)
  with pytest.raises(ValueError, match="needs a negative_context"):
    fn({}, x, jnp.ones((1, 1, 1)), None, jax.random.key(0))


def test_addnoise_condition_feeds_renoised_prefix_and_keeps_it_clean():
  a, prefix = 20.0, 2
  solver = unipc.FlowUniPC.create(4, 5.0)
  plan = forcing.ForcingPlan.create(5, solver.timesteps, num_prefix=prefix)
  seen = []

  def recording(variables, x, t, ctx):
    jax.debug.callback(lambda x_, t_: seen.append((np.asarray(x_), np.asarray(t_))), x, t, ordered=True)
    return jnp.zeros_like(x)

  clean = np.random.default_rng(1).standard_normal((1, 5, 16, 16, 1)).astype(np.float32)
  fn = jax.jit(forcing.make_denoiser(recording, plan, solver, addnoise_condition=a))
  out = np.asarray(fn({}, jnp.asarray(clean), jnp.zeros((1, 1, 1)), None, jax.random.key(3)))
  assert len(seen) == plan.num_rows == 4
  residuals = []
  for x_in, t_in in seen:
    np.testing.assert_array_equal(t_in[:, :prefix], a)  # prefix fed t = a
    np.testing.assert_array_equal(t_in[:, prefix:], plan.step_matrix[len(residuals), prefix:][None])
    eps = (x_in[:, :prefix] - (1 - a / 1000) * clean[:, :prefix]) / (a / 1000)  # the added noise, recovered
    assert abs(eps.std() - 1.0) < 0.1 and abs(eps.mean()) < 0.1
    residuals.append(eps)
  assert not np.allclose(residuals[0], residuals[1])  # fresh noise every row
  np.testing.assert_array_equal(out[:, :prefix], clean[:, :prefix])  # stored prefix stays clean
  plain = np.asarray(
    jax.jit(forcing.make_denoiser(recording, plan, solver))(
      {}, jnp.asarray(clean), jnp.zeros((1, 1, 1)), None, jax.random.key(3)
    )
  )
  np.testing.assert_array_equal(seen[-1][0][:, :prefix], clean[:, :prefix])  # a = 0: fed clean at t = 0
  np.testing.assert_array_equal(seen[-1][1][:, :prefix], 0)
  np.testing.assert_array_equal(plain[:, :prefix], clean[:, :prefix])


# ----------------------------------------------------------------------------------------------------------------
# rollout


def analytic_sampler(traces=None, **settings):
  defaults = dict(base_num_frames=6, overlap_history=2, num_steps=3, shift=5.0, guidance_scale=1.0)
  settings = long_video.RolloutSettings(**{**defaults, **settings})

  def apply_fn(variables, x, t, ctx):
    if traces is not None:
      traces.append(x.shape)
    return velocity_jax(variables, x, t, ctx)

  return long_video.LongVideoSampler(apply_fn, {}, settings, latent_shape=(2, 2, 1))


def contexts(n):
  return [jnp.full((1, 2, 3), float(i)) for i in range(n)]


def test_rollout_frame_counts_and_trimming():
  traces = []
  sampler = analytic_sampler(traces)
  chunks = list(sampler.stream(contexts(1)[0], num_windows=5, key=jax.random.key(0), progress=False))
  assert [c.shape[1] for c in chunks] == [6, 4, 4, 4, 4]
  assert sum(c.shape[1] for c in chunks) == sampler.settings.total_frames(5) == 22
  assert len(traces) == 2  # one compiled program for the first window, one shared by all the others
  assert sampler.settings.windows_for(15) == 4 and sampler.settings.windows_for(6) == 1
  video = sampler.generate(contexts(1)[0], num_frames=15, key=jax.random.key(0), progress=False)
  assert video.shape == (1, 15, 2, 2, 1)
  np.testing.assert_array_equal(video, np.concatenate(chunks, axis=1)[:, :15])


def test_rollout_carries_overlap_as_clean_prefix_and_travels_prompts():
  sampler = analytic_sampler()
  key = jax.random.key(7)
  prompts = contexts(2)  # window 0 -> prompt 0, windows 1, 2 -> prompt 1 (the last one holds)
  chunks = list(sampler.stream(prompts, num_windows=3, key=key, progress=False))
  # Re-run the windows by hand with the same noise, prefix and prompts.
  shape = (1, 6, 2, 2, 1)
  w0 = sampler.window_fn(0)(
    {}, jax.random.normal(jax.random.fold_in(key, 0), shape), prompts[0], None, jax.random.fold_in(key, 1_000_003)
  )
  np.testing.assert_allclose(chunks[0], w0, atol=1e-6)
  prev = w0
  for i in (1, 2):
    start = jax.random.normal(jax.random.fold_in(key, i), shape).at[:, :2].set(prev[:, -2:])
    wi = sampler.window_fn(2)({}, start, prompts[1], None, jax.random.fold_in(key, 1_000_003 + i))
    np.testing.assert_array_equal(wi[:, :2], prev[:, -2:])  # the carried frames are not touched
    np.testing.assert_allclose(chunks[i], wi[:, 2:], atol=1e-6)
    prev = wi
  other = list(sampler.stream(contexts(1)[0], num_windows=3, key=key, progress=False))
  np.testing.assert_allclose(other[0], chunks[0], atol=1e-6)  # same first prompt
  assert not np.allclose(other[1], chunks[1])  # the second window followed prompt 1


def test_image_prefix_shorter_than_a_block_is_kept():
  sampler = analytic_sampler(ar_step=1, causal_block_size=2, base_num_frames=6, overlap_history=2)
  image = jnp.full((1, 1, 2, 2, 1), 0.25)
  chunks = list(sampler.stream(contexts(1)[0], image_prefix=image, num_windows=2, progress=False))
  np.testing.assert_array_equal(chunks[0][:, :1], image)
  with pytest.raises(ValueError, match=r"image_prefix must be \[B, P0, 2, 2, 1\] with 0 < P0 < 6"):
    next(sampler.stream(contexts(1)[0], image_prefix=jnp.zeros((1, 6, 2, 2, 1)), progress=False))


def test_infinite_and_iterator_prompts():
  sampler = analytic_sampler()
  endless = sampler.stream(lambda i: jnp.full((1, 2, 3), math.sin(i)), progress=False)
  assert [c.shape[1] for c in itertools.islice(endless, 4)] == [6, 4, 4, 4]
  finite = list(sampler.stream(iter(contexts(3)), progress=False))
  assert len(finite) == 3  # the rollout ends with the prompts


def test_rollout_errors():
  with pytest.raises(ValueError, match=r"overlap_history=6 must be in \[0, base_num_frames=6\)"):
    long_video.RolloutSettings(base_num_frames=6, overlap_history=6)
  sampler = analytic_sampler(guidance_scale=5.0)
  with pytest.raises(ValueError, match="needs negative_prompts"):
    next(sampler.stream(contexts(1)[0], progress=False))
  with pytest.raises(ValueError, match="unknown solver 'ddim'"):
    analytic_sampler(solver="ddim")


def test_tiny_video_dit_rollout_end_to_end():
  """The real model from configs/video.py:tiny with fps embedding, CFG, add-noise and async blocks: 2 windows."""
  config = config_lib.load_config(
    "configs/video.py:tiny",
    [
      "--config.sampling.ar_step=1",
      "--config.sampling.causal_block_size=2",
      "--config.model.causal_block_size=2",
      "--config.sampling.num_steps=2",
      "--config.sampling.latent_height=4",
      "--config.sampling.latent_width=4",
    ],
  )
  s = config.sampling
  model = video_dit.from_config(config.model, dtype=config.dtype)
  shape = (s.latent_height, s.latent_width, config.model.in_channels)
  ctx = jnp.asarray(np.random.default_rng(0).standard_normal((1, s.text_len, config.model.text_dim)), jnp.float32)
  variables = jax.jit(model.init)(
    jax.random.key(0),
    jnp.zeros((1, s.base_num_frames) + shape),
    jnp.zeros((1, s.base_num_frames)),
    ctx,
    jnp.zeros((1,), jnp.int32),
  )
  sampler = long_video.LongVideoSampler(
    long_video.video_dit_apply(model, fps=s.fps),
    variables,
    long_video.RolloutSettings.from_config(s),
    latent_shape=shape,
  )
  a = list(sampler.stream(ctx, negative_prompts=-ctx, num_windows=2, key=jax.random.key(1), progress=False))
  b = list(sampler.stream(ctx, negative_prompts=-ctx, num_windows=2, key=jax.random.key(1), progress=False))
  assert [c.shape for c in a] == [(1, 8, 4, 4, 4), (1, 6, 4, 4, 4)]
  assert all(np.isfinite(c).all() for c in a)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)  # seeded: the same video again
