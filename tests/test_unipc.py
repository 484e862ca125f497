"""Flow UniPC and Euler with per-frame step state, against diffusers' UniPCMultistepScheduler.

The analytic model v(x, t) = cos(t / 300) x + sin(3x) / 2 + t / 1000 is nonlinear in x and depends on the timestep,
so every history term of the multistep solver matters.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler

from cinema_jax.diffusion import unipc


def velocity(x, t):
  t = np.asarray(t, np.float64).reshape(np.shape(t) + (1,) * (np.ndim(x) - np.ndim(t)))
  return (np.cos(t / 300.0) * x + 0.5 * np.sin(3.0 * x) + t / 1000.0).astype(np.float32)


def diffusers_scheduler(num_steps, shift):
  s = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
  s.set_timesteps(num_steps)
  return s


@pytest.mark.parametrize("shift", [1.0, 5.0, 8.0])
@pytest.mark.parametrize("num_steps", [1, 2, 3, 30])
def test_schedule_equals_diffusers(shift, num_steps):
  ref = diffusers_scheduler(num_steps, shift)
  sigmas, timesteps = unipc.flow_sigmas(num_steps, shift)
  np.testing.assert_array_equal(sigmas, ref.sigmas.numpy())
  np.testing.assert_array_equal(timesteps, ref.timesteps.numpy())


def test_schedule_hand_values():
  sigmas, timesteps = unipc.flow_sigmas(30, 8.0)
  assert timesteps[:4].tolist() == [999, 995, 991, 986] and timesteps[-3:].tolist() == [473, 367, 221]
  sigmas1, t1 = unipc.flow_sigmas(4, 1.0)  # unshifted: linspace(1, 0.001, 5)[:4], first nudged below 1
  np.testing.assert_allclose(sigmas1, [1 - 1e-6, 0.75025, 0.5005, 0.25075, 0.0], rtol=1e-6)
  assert t1.tolist() == [999, 750, 500, 250]


@pytest.mark.parametrize("shift", [1.0, 5.0, 8.0])
def test_trajectory_equals_diffusers(shift):
  """The whole trajectory (every intermediate sample) within 1e-5, for 30 steps and for short schedules."""
  rng = np.random.default_rng(0)
  for num_steps in (30, 3, 2):
    ref = diffusers_scheduler(num_steps, shift)
    solver = unipc.FlowUniPC.create(num_steps, shift)
    x0 = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)  # [B, F, ...]
    xt, xj = torch.from_numpy(x0.copy()), jnp.asarray(x0)
    state = solver.init(xj)
    step = jax.jit(solver.step)
    for k, t in enumerate(ref.timesteps):
      xt = ref.step(torch.from_numpy(velocity(xt.numpy(), float(t))), t, xt).prev_sample
      v = velocity(np.asarray(xj), float(solver.timesteps[k]))
      xj, state = step(state, xj, jnp.asarray(v), jnp.full((3,), k), jnp.ones((3,), bool))
      np.testing.assert_allclose(np.asarray(xj), xt.numpy(), atol=1e-5, rtol=0)


def test_frames_at_different_steps_each_follow_their_own_scheduler():
  """One vectorised update moves frames that sit at different steps; each equals its own diffusers instance."""
  num_steps, shift, frames = 8, 5.0, 4
  lag = np.array([0, 2, 3, 5])  # frame f starts at row lag[f]
  solver = unipc.FlowUniPC.create(num_steps, shift)
  schedulers = [copy.deepcopy(diffusers_scheduler(num_steps, shift)) for _ in range(frames)]
  rng = np.random.default_rng(1)
  x0 = rng.standard_normal((1, frames, 6)).astype(np.float32)
  ref, xj = x0.copy(), jnp.asarray(x0)
  state = solver.init(xj)
  for row in range(num_steps + lag.max()):
    k = row - lag
    update = (k >= 0) & (k < num_steps)
    t = solver.timesteps[np.clip(k, 0, num_steps - 1)]
    v = velocity(np.asarray(xj), t[None])
    xj, state = solver.step(state, xj, jnp.asarray(v), jnp.asarray(k), jnp.asarray(update))
    for f in np.nonzero(update)[0]:
      vf = torch.from_numpy(velocity(ref[:, f], float(t[f])))
      ref[:, f] = schedulers[f].step(vf, int(t[f]), torch.from_numpy(ref[:, f].copy())).prev_sample.numpy()
    np.testing.assert_allclose(np.asarray(xj), ref, atol=1e-5, rtol=0)


def test_frames_without_update_keep_sample_and_history():
  solver = unipc.FlowUniPC.create(5, 8.0)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 3, 4)), jnp.float32)
  state = solver.init(x)
  x1, state1 = solver.step(state, x, x * 0.5, jnp.array([0, 0, 0]), jnp.array([True, False, True]))
  np.testing.assert_array_equal(x1[:, 1], x[:, 1])
  for a, b in zip(state1, state, strict=True):
    np.testing.assert_array_equal(a[:, 1], b[:, 1])
  assert not np.allclose(x1[:, 0], x[:, 0])


@pytest.mark.parametrize("name", ["unipc", "euler"])
def test_exact_velocity_lands_on_data(name):
  """For x_sigma = (1 - sigma) x0 + sigma eps and the true velocity eps - x0, every solver ends exactly at x0."""
  rng = np.random.default_rng(3)
  data = rng.standard_normal((1, 2, 8)).astype(np.float32)
  eps = rng.standard_normal((1, 2, 8)).astype(np.float32)
  solver = unipc.make_solver(name, 7, 5.0)
  x = jnp.asarray((1 - solver.sigmas[0]) * data + solver.sigmas[0] * eps)
  state = solver.init(x)
  for k in range(solver.num_steps):
    x, state = solver.step(state, x, jnp.asarray(eps - data), jnp.full((2,), k), jnp.ones((2,), bool))
    sigma = solver.sigmas[k + 1]
    np.testing.assert_allclose(x, (1 - sigma) * data + sigma * eps, atol=2e-5)
  np.testing.assert_allclose(x, data, atol=2e-5)


def test_solver_errors():
  with pytest.raises(ValueError, match="unknown solver 'heun'; choose one of unipc, euler"):
    unipc.make_solver("heun", 4, 1.0)
  with pytest.raises(ValueError, match="order 1 or 2"):
    unipc.FlowUniPC.create(4, 1.0, order=3)
  with pytest.raises(ValueError, match="flow shift must be > 0"):
    unipc.flow_sigmas(4, 0.0)
