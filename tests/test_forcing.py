"""Diffusion forcing: the timestep matrix (hand-written, a re-implementation, diffusers), training noise, the loss."""

import ast
import itertools
import math
import pathlib

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from cinema_jax.diffusion import forcing, unipc
from cinema_jax.models import video_dit


def diffusers_timestep_matrix():
  """diffusers' generate_timestep_matrix, loaded from its pipeline file (importing the pipeline needs transformers)."""
  path = pathlib.Path(diffusers.__file__).parent / "pipelines/skyreels_v2/pipeline_skyreels_v2_diffusion_forcing.py"
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.FunctionDef) and node.name == "generate_timestep_matrix":
      namespace = {"torch": torch, "math": math}
      exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
      fn = namespace["generate_timestep_matrix"]
      return lambda *args: fn(None, *args)
  raise AssertionError("generate_timestep_matrix not found in diffusers")


def reference_timestep_matrix(num_frames, template, base, ar_step, pre, cbs):
  """A plain re-statement of the SkyReels schedule, block by block, for comparison."""
  n = len(template)
  table = [999, *template, 0]
  blocks, window = num_frames // cbs, base // cbs
  progress = [n + 1 if b < pre // cbs else 0 for b in range(blocks)]
  rows = []
  while min(progress) < n:
    nxt = []
    for b in range(blocks):
      if b == 0 or progress[b - 1] >= n:
        nxt.append(min(progress[b] + 1, n + 1))
      else:
        nxt.append(min(max(nxt[b - 1] - ar_step, 0), n + 1))
    rows.append((nxt, [nx != p and nx != n + 1 for nx, p in zip(nxt, progress, strict=True)]))
    progress = nxt
  end, intervals = window, []
  for _, upd in rows:
    if end < blocks and upd[end]:
      end += 1
    intervals.append((max(end - window, 0) * cbs, end * cbs))

  def per_frame(values):
    return np.array([[v for v in row for _ in range(cbs)] for row in values])

  index = per_frame([r for r, _ in rows])
  return per_frame([[table[i] for i in r] for r, _ in rows]), index, per_frame([u for _, u in rows]), intervals


def test_timestep_matrix_hand_case_async():
  """3 frames, template [900, 500, 100], ar_step 1: a wave, each frame one step behind the previous."""
  steps, index, update, interval = forcing.timestep_matrix(3, [900, 500, 100], 3, ar_step=1)
  np.testing.assert_array_equal(steps, [[900, 999, 999], [500, 900, 999], [100, 500, 900], [0, 100, 500], [0, 0, 100]])
  np.testing.assert_array_equal(index, [[1, 0, 0], [2, 1, 0], [3, 2, 1], [4, 3, 2], [4, 4, 3]])
  np.testing.assert_array_equal(update, [[1, 0, 0], [1, 1, 0], [1, 1, 1], [0, 1, 1], [0, 0, 1]])
  np.testing.assert_array_equal(interval, [[0, 3]] * 5)


def test_timestep_matrix_hand_case_prefix_blocks_window():
  """6 frames in blocks of 2, the first block a clean prefix, windows of 4 frames, template [800, 300]."""
  steps, index, update, interval = forcing.timestep_matrix(
    6, [800, 300], 4, ar_step=1, num_pre_ready=2, causal_block_size=2
  )
  np.testing.assert_array_equal(steps, [[0, 0, 800, 800, 999, 999], [0, 0, 300, 300, 800, 800], [0, 0, 0, 0, 300, 300]])
  np.testing.assert_array_equal(index, [[3, 3, 1, 1, 0, 0], [3, 3, 2, 2, 1, 1], [3, 3, 3, 3, 2, 2]])
  np.testing.assert_array_equal(update, [[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
  np.testing.assert_array_equal(interval, [[0, 4], [2, 6], [2, 6]])


def test_timestep_matrix_synchronous_is_the_template():
  template = unipc.flow_sigmas(10, 8.0)[1]
  steps, index, update, _ = forcing.timestep_matrix(5, template, 5, ar_step=0)
  np.testing.assert_array_equal(steps, np.repeat(template[:, None], 5, axis=1))
  assert update.all() and index[:, 0].tolist() == list(range(1, 11))


GRID = [
  (frames, steps, ar, pre, cbs, base)
  for frames, steps, ar, pre, cbs, base in itertools.product(
    (5, 10, 25, 30), (4, 10, 30), (0, 5), (0, 5), (1, 5), ("all", 10)
  )
  if pre < frames
]


def test_timestep_matrix_grid_matches_reference_and_diffusers():
  generate = diffusers_timestep_matrix()
  checked = refused = 0
  for frames, steps, ar, pre, cbs, base in GRID:
    base = frames if base == "all" else base
    template = unipc.flow_sigmas(steps, 8.0)[1]
    try:
      ref = generate(frames, torch.from_numpy(template), base, ar, pre, cbs)
    except ValueError as e:  # ar_step too small for the window: both refuse
      assert "ar_step" in str(e)
      with pytest.raises(ValueError, match=f"ar_step={ar} is too small"):
        forcing.timestep_matrix(frames, template, base, ar, pre, cbs)
      refused += 1
      continue
    ours = forcing.timestep_matrix(frames, template, base, ar, pre, cbs)
    mine = reference_timestep_matrix(frames, template.tolist(), base, ar, pre, cbs)
    for a, b, c in zip(ours[:3], ref[:3], mine[:3], strict=True):
      np.testing.assert_array_equal(a, b.numpy())
      np.testing.assert_array_equal(a, c)
    assert [tuple(v) for v in ours[3].tolist()] == [tuple(v) for v in ref[3]] == mine[3]
    if ar == 0:
      assert len(ours[0]) == steps
    elif base >= frames:
      assert len(ours[0]) == steps + (frames // cbs - pre // cbs - 1) * min(ar, steps)  # a lag beyond N waits
    checked += 1
  assert checked >= 140 and refused > 0


def test_timestep_matrix_documented_counts():
  """skyreels-v2.md: 25 latents, blocks of 5, ar_step 5, 30 steps -> 50 rows; with a 5-frame prefix, 45 rows."""
  template = unipc.flow_sigmas(30, 8.0)[1]
  assert forcing.timestep_matrix(25, template, 25, 5, 0, 5)[0].shape == (50, 25)
  assert forcing.timestep_matrix(25, template, 25, 5, 5, 5)[0].shape == (45, 25)


def test_timestep_matrix_refuses_partial_blocks():
  template = [900, 500, 100]
  # diffusers keeps only whole blocks (7 frames -> 5 columns); we refuse instead of dropping frames.
  assert diffusers_timestep_matrix()(7, torch.tensor(template), 7, 0, 0, 5)[0].shape[1] == 5
  with pytest.raises(ValueError, match=r"num_frames=7 is not divisible by causal_block_size=5"):
    forcing.timestep_matrix(7, template, 7, 0, 0, 5)
  with pytest.raises(ValueError, match=r"base_num_frames=7 is not divisible by causal_block_size=5"):
    forcing.timestep_matrix(10, template, 7, 0, 0, 5)
  with pytest.raises(ValueError, match=r"num_pre_ready=1 is not divisible by causal_block_size=5"):
    forcing.timestep_matrix(10, template, 10, 0, 1, 5)
  with pytest.raises(ValueError, match=r"ar_step=1 is too small .* at least 2"):
    forcing.timestep_matrix(10, [1, 2, 3, 4], 2, 1)


def test_plan_pins_a_prefix_shorter_than_a_block():
  """One image latent with blocks of 5 (SkyReels issue 27): frame 0 stays clean (t = 0, never updated)."""
  template = unipc.flow_sigmas(6, 5.0)[1]
  plan = forcing.ForcingPlan.create(10, template, ar_step=2, num_prefix=1, causal_block_size=5)
  assert (plan.step_matrix[:, 0] == 0).all() and not plan.update_mask[:, 0].any()
  full = forcing.timestep_matrix(10, template, 10, 2, 0, 5)
  np.testing.assert_array_equal(plan.step_matrix[:, 1:], full[0][:, 1:])
  assert plan.window == 10 and plan.num_prefix == 1


# ----------------------------------------------------------------------------------------------------------------
# training noise


def histograms(levels, bins=10, num_levels=1000):
  """Per-frame fraction of samples in each of ``bins`` equal level ranges: [F, bins]."""
  idx = np.asarray(levels) * bins // num_levels
  return np.stack([np.bincount(idx[:, f], minlength=bins) / len(idx) for f in range(idx.shape[1])])


@pytest.mark.parametrize("mode", ["synchronous", "independent"])
def test_uniform_modes_have_uniform_marginals(mode):
  levels = np.asarray(forcing.sample_noise_levels(jax.random.key(0), 20000, 6, mode=mode))
  assert levels.dtype == np.int32 and levels.min() >= 0 and levels.max() <= 999
  np.testing.assert_allclose(histograms(levels), 0.1, atol=0.01)  # binomial std 0.002
  corr = np.corrcoef(levels.T.astype(np.float64))
  if mode == "synchronous":
    assert (levels == levels[:, :1]).all()
  else:
    assert np.abs(corr[np.triu_indices(6, 1)]).max() < 0.03


@pytest.mark.parametrize("spread", [0.3, 0.6])
def test_non_decreasing_never_decreases_and_stays_near_uniform(spread):
  levels = np.asarray(forcing.sample_noise_levels(jax.random.key(1), 40000, 8, mode="non_decreasing", spread=spread))
  assert (np.diff(levels, axis=1) >= 0).all()  # earlier frames never noisier
  hist = histograms(levels)
  lo, hi = 0.1 / (1 + spread), 0.1 / (1 - spread)  # the density bounds of the construction
  assert hist.min() >= lo - 0.005 and hist.max() <= hi + 0.005
  tv = 0.5 * np.abs(hist - 0.1).sum(axis=1)
  assert tv.max() <= spread / 2 + 0.01
  middle = hist[3:5]  # inner frames are closer to uniform than the first and last
  assert 0.5 * np.abs(middle - 0.1).sum(axis=1).max() < tv[[0, -1]].min()
  lag = (levels[:, -1] - levels[:, 0]) / 1000
  assert lag.max() <= spread + 1e-3 and lag.mean() > spread / 8  # frames really lag each other


def test_noise_blocks_and_errors():
  levels = np.asarray(forcing.sample_noise_levels(jax.random.key(2), 100, 6, mode="independent", causal_block_size=3))
  assert (levels[:, :3] == levels[:, :1]).all() and (levels[:, 3:] == levels[:, 3:4]).all()
  assert (levels[:, 0] != levels[:, 3]).any()
  flat = np.asarray(forcing.sample_noise_levels(jax.random.key(3), 50, 4, mode="non_decreasing", spread=0.0))
  assert (flat == flat[:, :1]).all()  # no spread: synchronous
  with pytest.raises(ValueError, match="num_frames=5 is not divisible by causal_block_size=2"):
    forcing.sample_noise_levels(jax.random.key(0), 2, 5, causal_block_size=2)
  with pytest.raises(ValueError, match="unknown noise mode 'fopp'"):
    forcing.sample_noise_levels(jax.random.key(0), 2, 4, mode="fopp")
  with pytest.raises(ValueError, match=r"spread must be in \[0, 1\)"):
    forcing.sample_noise_levels(jax.random.key(0), 2, 4, spread=1.0)


def test_levels_to_sigmas_and_inputs_by_hand():
  np.testing.assert_allclose(forcing.levels_to_sigmas(jnp.array([0, 499, 999])), [0.001, 0.5, 1.0], rtol=1e-6)
  np.testing.assert_allclose(forcing.levels_to_sigmas(jnp.array([499]), shift=3.0), [0.75], rtol=1e-6)
  x0 = jnp.ones((1, 2, 3))
  eps = jnp.full((1, 2, 3), 3.0)
  noisy, t, target = forcing.flow_matching_inputs(x0, eps, jnp.array([[0.25, 0.25]]), num_prefix_frames=1)
  np.testing.assert_allclose(noisy[0, 0], 1.0)  # the prefix frame stays clean
  np.testing.assert_allclose(noisy[0, 1], 1.5)  # 0.75 * 1 + 0.25 * 3
  np.testing.assert_allclose(t, [[0.0, 250.0]])
  np.testing.assert_allclose(target, 2.0)


def test_loss_per_frame_and_prefix_exclusion():
  target = jnp.zeros((2, 3, 4))
  pred = jnp.broadcast_to(jnp.array([1.0, 2.0, 3.0])[None, :, None], (2, 3, 4))
  total, per_frame = forcing.flow_matching_loss(pred, target, num_prefix_frames=1)
  np.testing.assert_allclose(per_frame, [[1, 4, 9]] * 2)
  np.testing.assert_allclose(total, 6.5)
  total_all, _ = forcing.flow_matching_loss(pred, target, num_prefix_frames=1, exclude_prefix=False)
  np.testing.assert_allclose(total_all, 14 / 3, rtol=1e-6)


@pytest.mark.slow
def test_diffusion_forcing_training_step_learns():
  """A jitted step of the tiny video DiT on non-decreasing per-frame noise with a clean prefix lowers the loss."""
  model = video_dit.VideoDiT(
    width=32, heads=2, depth=1, ffn_dim=32, in_channels=4, out_channels=4, text_dim=8, freq_dim=16, causal_block_size=1
  )
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.standard_normal((4, 4, 4, 4, 4)) * 0.5 + 1.0, jnp.float32)
  ctx = jnp.asarray(rng.standard_normal((4, 3, 8)), jnp.float32)
  params = jax.jit(model.init)(jax.random.key(0), x0, jnp.zeros((4, 4)), ctx)["params"]
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, key):
    k_level, k_noise = jax.random.split(key)
    levels = forcing.sample_noise_levels(k_level, 4, 4, mode="non_decreasing")
    sigmas = forcing.levels_to_sigmas(levels, shift=3.0)
    noise = jax.random.normal(k_noise, x0.shape)
    noisy, t, target = forcing.flow_matching_inputs(x0, noise, sigmas, num_prefix_frames=1)

    def loss_fn(p):
      return forcing.flow_matching_loss(model.apply({"params": p}, noisy, t, ctx), target, num_prefix_frames=1)[0]

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  losses = []
  for i in range(40):
    params, opt, loss = step(params, opt, jax.random.key(i))
    losses.append(float(loss))
  assert np.isfinite(losses).all()
  assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5])
