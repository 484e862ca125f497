"""Samplers for rectified-flow models: Euler over a sigma schedule, with distilled guidance or classifier-free guidance.

Legend: ``...`` the sample's shape (e.g. [B, N, C] tokens); S schedule length (steps + 1).

A model enters as ``velocity_fn(x, t) -> v`` with x [...] and t a float32 scalar (the sampler's current time);
conditioning (text, memory keyframes, distilled guidance scale) is closed over by the caller. Classifier-free guidance
wraps a velocity function that evaluates the conditional and unconditional inputs on a doubled batch.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


def euler_step(x: jax.Array, v: jax.Array, t: jax.Array, t_next: jax.Array) -> jax.Array:
  """``x + (t_next - t) v`` in float32 (BFL ``img = img + (t_prev - t_curr) * pred``), cast back to x.dtype."""
  dt = jnp.asarray(t_next, jnp.float32) - jnp.asarray(t, jnp.float32)
  return (x.astype(jnp.float32) + dt * v.astype(jnp.float32)).astype(x.dtype)


def euler_sample(velocity_fn: VelocityFn, x: jax.Array, sigmas: jax.Array) -> jax.Array:
  """Integrates ``dx/dt = v(x, t)`` from ``sigmas[0]`` (noise) to ``sigmas[-1]`` (data) with Euler steps.

  Runs as one ``lax.fori_loop`` (traceable: jit the caller once per shape; the schedule is data, so a new step
  count or shift does not recompile unless the number of steps changes).
  """
  sigmas = jnp.asarray(sigmas, jnp.float32)
  if sigmas.ndim != 1 or sigmas.shape[0] < 2:
    raise ValueError(f"sigmas must be a 1-D schedule of at least 2 times, got shape {sigmas.shape}")

  def body(i, x):
    t, t_next = sigmas[i], sigmas[i + 1]
    return euler_step(x, velocity_fn(x, t), t, t_next)

  return jax.lax.fori_loop(0, sigmas.shape[0] - 1, body, x)


def classifier_free_guidance(v_cond: jax.Array, v_uncond: jax.Array, scale: float | jax.Array) -> jax.Array:
  """``v_uncond + scale (v_cond - v_uncond)``: scale 1 is the conditional velocity, 0 the unconditional one."""
  v_cond32, v_uncond32 = v_cond.astype(jnp.float32), v_uncond.astype(jnp.float32)
  return (v_uncond32 + scale * (v_cond32 - v_uncond32)).astype(v_cond.dtype)


def with_cfg(doubled_velocity_fn: VelocityFn, scale: float | jax.Array) -> VelocityFn:
  """Wraps ``f(x2, t)`` that evaluates ``[x; x]`` against ``[cond; uncond]`` on a doubled batch into a guided
  velocity function of x [B, ...]."""

  def velocity(x: jax.Array, t: jax.Array) -> jax.Array:
    v = doubled_velocity_fn(jnp.concatenate([x, x], axis=0), t)
    v_cond, v_uncond = jnp.split(v, 2, axis=0)
    return classifier_free_guidance(v_cond, v_uncond, scale)

  return velocity
