"""Rectified flow: noising, loss, timestep sampling, the Flux schedule (BFL formula, diffusers), Euler + guidance, and
keyframe k+1 generation from GoldenMem-packed keyframes 1..k."""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cinema_jax.config import load_config
from cinema_jax.diffusion import flow, samplers
from cinema_jax.pipelines import keyframes as kp

# ------------------------------------------------------------------------------------------- objective


def test_noising_target_and_loss_by_hand():
  x0 = jnp.array([[1.0, -2.0]])
  eps = jnp.array([[3.0, 4.0]])
  np.testing.assert_allclose(flow.add_noise(x0, eps, 0.25), [[1.5, -0.5]])  # 0.75 x0 + 0.25 eps
  np.testing.assert_allclose(flow.add_noise(x0, eps, jnp.array([[0.0], [1.0]])), [[1.0, -2.0], [3.0, 4.0]])
  np.testing.assert_allclose(flow.velocity_target(x0, eps), [[2.0, 6.0]])
  pred = jnp.array([[2.0, 4.0]])  # errors 0 and -2
  assert float(flow.flow_loss(pred, x0, eps)) == pytest.approx(2.0)
  assert float(flow.flow_loss(pred, x0, eps, weight=jnp.array([[1.0, 0.0]]))) == 0.0
  assert float(flow.flow_loss(pred, x0, eps, weight=jnp.zeros((1, 2)))) == 0.0


def test_timestep_samplers():
  key = jax.random.key(0)
  u = flow.sample_timesteps(key, (20000,), "uniform")
  assert 0.0 <= float(u.min()) and float(u.max()) <= 1.0 and float(u.mean()) == pytest.approx(0.5, abs=0.01)
  ln = flow.sample_timesteps(key, (20000,), "logit_normal", mean=0.0, std=1.0)
  logits = np.log(np.asarray(ln) / (1 - np.asarray(ln)))
  assert logits.mean() == pytest.approx(0.0, abs=0.03) and logits.std() == pytest.approx(1.0, abs=0.03)
  shifted = flow.sample_timesteps(key, (20000,), "uniform", shift_mu=1.0)
  assert float(shifted.mean()) > float(u.mean()) + 0.1  # shifting moves mass to noisier times
  kt = flow.keyframe_timesteps(key, 4, 3, num_memory=jnp.array([0, 1, 3]))
  assert kt.shape == (3, 4)
  np.testing.assert_array_equal(np.asarray(kt) == 0, [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]])
  tok = flow.per_token(jnp.array([[0.1, 0.9]]), jnp.array([[1, 1, 0, -1]]))
  np.testing.assert_allclose(tok[..., 0], [[0.9, 0.9, 0.1, 0.1]])
  with pytest.raises(ValueError, match="unknown timestep sampler 'beta'"):
    flow.sample_timesteps(key, (2,), "beta")


# -------------------------------------------------------------------------------------------- schedule


def bfl_schedule(num_steps, image_seq_len, base_shift=0.5, max_shift=1.15):
  """The BFL get_schedule formula in torch float32, written from its definition."""
  torch = pytest.importorskip("torch")
  t = torch.linspace(1, 0, num_steps + 1)
  slope = (max_shift - base_shift) / (4096 - 256)
  mu = image_seq_len * slope + (base_shift - slope * 256)
  return (math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)).numpy()


@pytest.mark.parametrize("seq_len", [64, 256, 1024, 1100, 4096, 6000])
@pytest.mark.parametrize("steps", [1, 4, 28, 50])
def test_flux_sigmas_match_the_bfl_formula(seq_len, steps):
  ours = flow.flux_sigmas(steps, seq_len)
  assert ours.shape == (steps + 1,) and ours[0] == 1.0 and ours[-1] == 0.0
  np.testing.assert_allclose(ours, bfl_schedule(steps, seq_len), atol=1e-6)
  assert np.all(np.diff(ours) < 0)


def test_flux_sigmas_by_hand_and_against_diffusers():
  # 256 tokens: mu = 0.5, so t = 0.5 -> e^0.5 / (e^0.5 + 1); 4096 tokens: mu = 1.15.
  np.testing.assert_allclose(flow.flux_sigmas(2, 256), [1.0, 0.6224593312018546, 0.0])
  np.testing.assert_allclose(flow.flux_sigmas(2, 4096), [1.0, math.exp(1.15) / (math.exp(1.15) + 1), 0.0])
  np.testing.assert_allclose(flow.flux_sigmas(4, 999, shift=False), [1.0, 0.75, 0.5, 0.25, 0.0])
  assert flow.flux_mu(256) == pytest.approx(0.5) and flow.flux_mu(4096) == pytest.approx(1.15)
  assert flow.flux_mu(1100) == pytest.approx(0.5 + (1100 - 256) * 0.65 / 3840)
  diffusers = pytest.importorskip("diffusers")
  for seq_len, steps in [(1024, 28), (4096, 50), (300, 8)]:
    mu = flow.flux_mu(seq_len)
    # diffusers' flow-matching Euler scheduler with dynamic shifting: linspace(1, 1/N, N) shifted by mu, then 0.
    sched = diffusers.FlowMatchEulerDiscreteScheduler(
      use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    np.testing.assert_allclose(flow.flux_sigmas(steps, seq_len), sched.sigmas.numpy(), atol=1e-6)
  with pytest.raises(ValueError, match="num_steps must be a positive integer"):
    flow.flux_sigmas(0, 256)


# ---------------------------------------------------------------------------------------------- samplers


def test_euler_with_the_exact_velocity_lands_on_the_data():
  """On a straight rectified-flow path the velocity (x - x0) / t is exact, so Euler reaches x0 for any schedule."""
  r = np.random.default_rng(0)
  x0 = jnp.asarray(r.standard_normal((2, 5, 3)), jnp.float32)
  noise = jnp.asarray(r.standard_normal((2, 5, 3)), jnp.float32)
  out = samplers.euler_sample(lambda x, t: (x - x0) / t, noise, flow.flux_sigmas(7, 1024))
  np.testing.assert_allclose(out, x0, atol=1e-5)
  const = samplers.euler_sample(lambda x, t: jnp.ones_like(x), noise, jnp.array([1.0, 0.3, 0.0]))
  np.testing.assert_allclose(const, noise - 1.0, atol=1e-6)  # integral of dt from 1 to 0 is -1
  np.testing.assert_allclose(samplers.euler_step(jnp.ones(2), jnp.full(2, 2.0), 0.5, 0.25), [0.5, 0.5])
  with pytest.raises(ValueError, match="sigmas must be a 1-D schedule"):
    samplers.euler_sample(lambda x, t: x, noise, jnp.array([1.0]))


def test_classifier_free_guidance_by_hand():
  v_c, v_u = jnp.array([2.0, 0.0]), jnp.array([1.0, 1.0])
  np.testing.assert_allclose(samplers.classifier_free_guidance(v_c, v_u, 3.0), [4.0, -2.0])
  np.testing.assert_allclose(samplers.classifier_free_guidance(v_c, v_u, 1.0), v_c)

  def doubled(x2, t):  # conditional half: x + 1, unconditional half: x - 1
    return x2 + jnp.array([1.0, -1.0])[:, None] * jnp.ones_like(x2)

  guided = samplers.with_cfg(doubled, 2.5)(jnp.zeros((1, 3)), 0.5)
  np.testing.assert_allclose(guided, [[4.0, 4.0, 4.0]])  # -1 + 2.5 * (1 - -1)


# ------------------------------------------------------------------------------------ keyframe generation


@pytest.fixture(scope="module")
def pipeline():
  config = load_config(
    "configs/keyframes.py:tiny",
    ["--config.frame.height=4", "--config.frame.width=4", "--config.sampling.num_steps=2"],
  )
  return kp.KeyframePipeline.from_config(config, seed=0)


def story(length, seed=0):
  r = np.random.default_rng(seed)
  latents = [r.standard_normal((8, 8, 4)).astype(np.float32) for _ in range(length)]
  caps = [
    kp.CaptionEmbedding(r.standard_normal((4, 32)).astype(np.float32), r.standard_normal(16).astype(np.float32))
    for _ in range(length + 1)
  ]
  return latents, caps


def test_prepare_packs_memory_and_current_keyframe(pipeline):
  latents, caps = story(3)
  prep = pipeline.prepare(latents, caps[:3], caps[3])
  b = prep.batch
  assert prep.memory.shapes == ((1, 1), (2, 2), (4, 4)) and prep.num_tokens == 16  # pyramid 4, 2, 1
  np.testing.assert_array_equal(b.layout.txt_segment[0], np.repeat([0, 1, 2, 3], 4))
  np.testing.assert_array_equal(b.layout.img_segment[0], [0] + [1] * 4 + [2] * 16 + [3] * 16)
  assert b.layout.txt_tokens_per_keyframe == 4 and b.layout.img_tokens_per_keyframe is None
  assert b.memory_tokens.shape == (1, 21, 16) and b.pooled.shape == (1, 4, 16)
  np.testing.assert_array_equal(b.pooled[0, -1], caps[3].pooled)  # the current caption is the last slot
  np.testing.assert_array_equal(b.txt[0, :4], caps[0].tokens)
  current = b.img_ids[0, 21:]
  np.testing.assert_array_equal(current[:, 0], 3)  # RoPE frame = slot index, after the memory slots
  np.testing.assert_array_equal(current[:5, 1:], [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0]])
  np.testing.assert_allclose(b.img_ids[0, 0], [0, 1.5, 1.5])  # the 1 x 1 slot at the frame centre
  assert b.guidance.tolist() == [3.5]
  np.testing.assert_allclose(prep.sigmas, flow.flux_sigmas(2, 16))
  full = pipeline.prepare(latents, caps[:3], caps[3], goldenmem_enabled=False)
  assert full.memory.shapes == ((4, 4),) * 3 and full.batch.layout.img_tokens_per_keyframe == 16


def test_sampler_keeps_memory_clean_and_integrates_the_current_keyframe(pipeline):
  """With a stand-in model whose velocity is exact for a target x0, the sampler returns x0; it checks that memory
  slots get t = 0 and that only the current keyframe's tokens are integrated."""
  latents, caps = story(3)
  prep = pipeline.prepare(latents, caps[:3], caps[3])
  n_mem = prep.batch.memory_tokens.shape[1]
  target = jnp.asarray(np.random.default_rng(1).standard_normal((1, 16, 16)), jnp.float32)

  def apply(variables, img, txt, pooled, times, img_ids, txt_ids, guidance, layout):
    assert img.shape == (1, n_mem + 16, 16) and times.shape == (1, 4)
    memory_clean = jnp.all(times[:, :-1] == 0)
    memory_fixed = jnp.all(img[:, :n_mem] == prep.batch.memory_tokens)
    ok = jnp.where(memory_clean & memory_fixed, 0.0, jnp.nan)
    v = (img[:, n_mem:] - target) / times[:, -1]
    return jnp.concatenate([jnp.zeros_like(img[:, :n_mem]), v + ok], axis=1)

  stub = types.SimpleNamespace(apply=apply)
  noise = pipeline.noise(0, 16)
  out = kp._sample(stub, None, prep.batch, noise, jnp.asarray(prep.sigmas, jnp.float32), 1.0)
  np.testing.assert_allclose(out, target, atol=1e-5)


def test_generate_next_uses_goldenmem_memory(pipeline):
  latents, caps = story(6)
  # Pyramid 4, 2, 1 (then 0): keyframes 4, 5, 6 fill the memory; keyframe 1 is outside it.
  base = pipeline.generate_next(latents, caps[:6], caps[6], seed=3)
  assert base.shape == (8, 8, 4) and np.isfinite(base).all()
  np.testing.assert_array_equal(pipeline.generate_next(latents, caps[:6], caps[6], seed=3), base)
  assert np.abs(pipeline.generate_next(latents, caps[:6], caps[6], seed=4) - base).max() > 1e-3
  outside = [x + (10.0 if i == 0 else 0.0) for i, x in enumerate(latents)]
  np.testing.assert_array_equal(pipeline.generate_next(outside, caps[:6], caps[6], seed=3), base)
  inside = [x + (1.0 if i == 5 else 0.0) for i, x in enumerate(latents)]
  assert np.abs(pipeline.generate_next(inside, caps[:6], caps[6], seed=3) - base).max() > 1e-4


def test_generate_story_and_classifier_free_guidance(pipeline):
  _, caps = story(2)
  frames = pipeline.generate_story(caps[:2], seed=0)
  assert len(frames) == 2 and all(f.shape == (8, 8, 4) for f in frames)
  guided = kp.KeyframePipeline(pipeline.module, pipeline.variables, pipeline.config.copy_and_resolve_references())
  guided.config.unlock()
  guided.config.sampling.cfg_scale = 3.0
  prep = guided.prepare(frames[:1], caps[:1], caps[1])
  assert prep.batch.cfg and prep.batch.txt.shape[0] == 2
  np.testing.assert_array_equal(prep.batch.txt[1, 4:], 0.0)  # unconditional copy: current caption zeroed
  np.testing.assert_array_equal(prep.batch.txt[1, :4], prep.batch.txt[0, :4])  # memory captions kept
  out = guided.generate_next(frames[:1], caps[:1], caps[1], seed=1)
  plain = pipeline.generate_next(frames[:1], caps[:1], caps[1], seed=1)
  assert out.shape == plain.shape and np.abs(out - plain).max() > 1e-3


def test_prepare_rejects_mismatches(pipeline):
  latents, caps = story(2)
  with pytest.raises(ValueError, match="2 history keyframes but 1 history captions"):
    pipeline.prepare(latents, caps[:1], caps[2])
  with pytest.raises(ValueError, match=r"the config says \(4, 4\)"):
    pipeline.prepare([np.zeros((4, 4, 4), np.float32)], caps[:1], caps[1])
