"""Diffusion forcing: per-frame noise levels for training, the SkyReels timestep matrix, and the compiled sampler.

Legend: B batch, F latent frames, NB = F / causal_block_size frame blocks, R rows of the timestep matrix (one model
forward each), W frames per forward (the window), N solver steps, ``...`` the rest of a frame (rows, cols, channels).

Training (``sample_noise_levels``, ``flow_matching_inputs``, ``flow_matching_loss``): every frame block gets its own
noise level in {0 .. num_levels - 1}; sigma = shift((level + 1) / num_levels); x_sigma = (1 - sigma) x0 + sigma eps;
the target is v = eps - x0 and the loss is a mean square per frame, optionally without the clean prefix frames.

Inference (``timestep_matrix``, ``ForcingPlan``, ``make_denoiser``): row r of the matrix gives every frame the
timestep it is fed and whether its solver steps; a frame that has not started is fed pure noise at t = 999, a
finished or prefix frame its clean latent at t = 0 (or, with add-noise conditioning a > 0, the prefix re-noised to
sigma = a / 1000 and fed t = a). The row loop is one ``lax.scan`` over static-shape rows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

NOISE_MODES = ("synchronous", "independent", "non_decreasing")

# ----------------------------------------------------------------------------------------------------------------
# training: per-frame noise levels


def _num_blocks(num_frames: int, causal_block_size: int, what: str = "num_frames") -> int:
  if causal_block_size < 1:
    raise ValueError(f"causal_block_size must be >= 1, got {causal_block_size}")
  if num_frames % causal_block_size:
    raise ValueError(
      f"{what}={num_frames} is not divisible by causal_block_size={causal_block_size}; frames of a partial block "
      "would be dropped"
    )
  return num_frames // causal_block_size


def sample_noise_levels(
  key: jax.Array,
  batch: int,
  num_frames: int,
  *,
  mode: str = "non_decreasing",
  causal_block_size: int = 1,
  num_levels: int = 1000,
  spread: float = 0.3,
) -> jax.Array:  # int32 [B, F] in [0, num_levels)
  """Per-frame noise levels, one per block of ``causal_block_size`` frames, each frame's marginal near uniform.

  * ``synchronous``: one uniform level per video (exactly uniform marginals).
  * ``independent``: an independent uniform level per block (exactly uniform marginals).
  * ``non_decreasing``: levels never decrease along time (earlier frames never noisier). Exactly uniform marginals
    are impossible here unless all blocks share one level (equal marginals and t_{i+1} >= t_i force
    t_{i+1} = t_i almost surely), so the lag between blocks trades against uniformity through ``spread`` = a:
    with u ~ U(0, 1) per video and c_1 <= ... <= c_NB = a (2 sort(U(0, 1)^NB) - 1) per video,
    t_i = u + c_i min(u, 1 - u). Each t_i has a density within [1/(1 + a), 1/(1 - a)] (total variation to uniform
    <= a / 2), levels are monotone in i, and blocks lag each other by up to a (mid-range levels, over the video).
  """
  if mode not in NOISE_MODES:
    raise ValueError(f"unknown noise mode {mode!r}; choose one of {', '.join(NOISE_MODES)}")
  if not 0.0 <= spread < 1.0:
    raise ValueError(f"spread must be in [0, 1), got {spread}")
  nb = _num_blocks(num_frames, causal_block_size)
  k_u, k_c = jax.random.split(key)
  if mode == "synchronous":
    t = jnp.broadcast_to(jax.random.uniform(k_u, (batch, 1)), (batch, nb))
  elif mode == "independent":
    t = jax.random.uniform(k_u, (batch, nb))
  else:
    u = jax.random.uniform(k_u, (batch, 1))
    c = spread * (2.0 * jnp.sort(jax.random.uniform(k_c, (batch, nb)), axis=-1) - 1.0)  # [b, nb], non-decreasing
    t = u + c * jnp.minimum(u, 1.0 - u)
  levels = jnp.clip(jnp.floor(t * num_levels), 0, num_levels - 1).astype(jnp.int32)  # [b, nb]
  return jnp.repeat(levels, causal_block_size, axis=1)  # [b, f]


def levels_to_sigmas(levels: jax.Array, num_levels: int = 1000, shift: float = 1.0) -> jax.Array:
  """sigma = shift(u) = s u / (1 + (s - 1) u) with u = (level + 1) / num_levels, in (0, 1]."""
  u = (jnp.asarray(levels, jnp.float32) + 1.0) / num_levels
  return shift * u / (1.0 + (shift - 1.0) * u)


def flow_matching_inputs(
  x0: jax.Array,  # [B, F, ...] clean latents
  noise: jax.Array,  # [B, F, ...]
  sigmas: jax.Array,  # [B, F]
  num_prefix_frames: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(noisy x_sigma, model timesteps 1000 sigma [B, F], velocity target eps - x0); prefix frames kept clean."""
  if sigmas.shape != x0.shape[:2]:
    raise ValueError(f"sigmas {sigmas.shape} must be [B, F] = {x0.shape[:2]}")
  if not 0 <= num_prefix_frames <= x0.shape[1]:
    raise ValueError(f"num_prefix_frames={num_prefix_frames} must be in [0, {x0.shape[1]}]")
  frame = jnp.arange(x0.shape[1])
  sigmas = jnp.where(frame[None] < num_prefix_frames, 0.0, sigmas)
  s = sigmas.reshape(sigmas.shape + (1,) * (x0.ndim - 2)).astype(jnp.float32)
  noisy = ((1.0 - s) * x0.astype(jnp.float32) + s * noise.astype(jnp.float32)).astype(x0.dtype)
  return noisy, sigmas * 1000.0, (noise.astype(jnp.float32) - x0.astype(jnp.float32))


def flow_matching_loss(
  prediction: jax.Array,  # [B, F, ...]
  target: jax.Array,  # [B, F, ...]
  *,
  num_prefix_frames: int = 0,
  exclude_prefix: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """(scalar loss, per-frame losses [B, F]): mean square over each frame, averaged over the frames that count."""
  err = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
  per_frame = jnp.mean(err.reshape(err.shape[:2] + (-1,)), axis=-1)  # [b, f]
  weight = jnp.ones(per_frame.shape[1], jnp.float32)
  if exclude_prefix:
    weight = jnp.where(jnp.arange(per_frame.shape[1]) < num_prefix_frames, 0.0, weight)
  total = jnp.sum(per_frame * weight[None]) / jnp.maximum(jnp.sum(weight) * per_frame.shape[0], 1.0)
  return total, per_frame


# ----------------------------------------------------------------------------------------------------------------
# inference: the timestep matrix


def timestep_matrix(
  num_frames: int,
  step_template,
  base_num_frames: int,
  ar_step: int = 5,
  num_pre_ready: int = 0,
  causal_block_size: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """SkyReels-V2's diffusion-forcing schedule: (step_matrix, step_index, update_mask, valid_interval).

  Blocks of ``causal_block_size`` frames carry a progress counter c in 0..N+1 (0 = not started, N+1 = done) over the
  extended template T = [999] + step_template + [0]. Each row: block 0 (or any block whose predecessor has finished)
  advances by one; every other block trails its predecessor by ``ar_step`` (0 = synchronous), clipped to
  [0, N+1]; rows are emitted until every counter reaches N. ``num_pre_ready`` leading frames start done.

  Returns step_matrix int64 [R, F] = T[c] (the timestep fed to each frame), step_index int64 [R, F] = c,
  update_mask bool [R, F] (c changed and is not N+1: the frame's solver steps), valid_interval int64 [R, 2]
  ((start, end) frames of the window the row runs on, at most ``base_num_frames`` wide).
  Frame counts that are not multiples of ``causal_block_size`` are refused rather than silently truncated.
  """
  template = np.asarray(step_template).astype(np.int64).reshape(-1)
  n = len(template)
  if n == 0:
    raise ValueError("step_template is empty")
  if ar_step < 0:
    raise ValueError(f"ar_step must be >= 0, got {ar_step}")
  nb = _num_blocks(num_frames, causal_block_size, "num_frames")
  base_nb = _num_blocks(base_num_frames, causal_block_size, "base_num_frames")
  pre_nb = _num_blocks(num_pre_ready, causal_block_size, "num_pre_ready")
  if base_nb < 1:
    raise ValueError(f"base_num_frames must be >= causal_block_size, got {base_num_frames}")
  if pre_nb > nb:
    raise ValueError(f"num_pre_ready={num_pre_ready} exceeds num_frames={num_frames}")
  if base_nb < nb and ar_step < n / base_nb:
    # Fewer window blocks than blocks: the wave must move on before the window fills, as SkyReels requires.
    raise ValueError(
      f"ar_step={ar_step} is too small for {nb} blocks in windows of {base_nb}: it must be at least "
      f"{math.ceil(n / base_nb)} (= ceil(steps / window blocks))"
    )
  extended = np.concatenate([[999], template, [0]]).astype(np.int64)
  done = n + 1
  prev = np.zeros(nb, np.int64)
  prev[:pre_nb] = done
  rows, masks = [], []
  while not np.all(prev >= n):
    new = np.zeros(nb, np.int64)
    for i in range(nb):
      if i == 0 or prev[i - 1] >= n:
        new[i] = prev[i] + 1
      else:
        new[i] = new[i - 1] - ar_step
    new = np.clip(new, 0, done)
    masks.append((new != prev) & (new != done))
    rows.append(new)
    prev = new
  step_index = np.stack(rows) if rows else np.zeros((0, nb), np.int64)
  update = np.stack(masks) if masks else np.zeros((0, nb), bool)
  # The window: ends at the furthest block that has started, holds at most base_nb blocks.
  intervals = []
  terminal = base_nb
  for row in update:
    if terminal < nb and row[terminal]:
      terminal += 1
    intervals.append((max(terminal - base_nb, 0), terminal))
  valid = np.asarray(intervals, np.int64).reshape(-1, 2) * causal_block_size
  expand = lambda a: np.repeat(a, causal_block_size, axis=1)  # noqa: E731
  return expand(extended[step_index]), expand(step_index), expand(update), valid


@dataclasses.dataclass(frozen=True, eq=False)
class ForcingPlan:
  """A sampling schedule with static shapes: the timestep matrix plus the prefix and window it runs with.

  ``num_prefix`` leading frames are clean conditioning (fed t = 0, never updated). When it is not a multiple of
  ``causal_block_size`` (one image latent with blocks of 5), the matrix is built for the whole blocks of the prefix
  and the remaining prefix frames are pinned to t = 0 without updates, so no conditioning frame is dropped.
  """

  step_matrix: np.ndarray  # int64 [R, F]
  step_index: np.ndarray  # int64 [R, F]
  update_mask: np.ndarray  # bool [R, F]
  valid_interval: np.ndarray  # int64 [R, 2]
  window: int  # W: frames per forward (the widest interval)
  num_prefix: int

  @classmethod
  def create(
    cls,
    num_frames: int,
    step_template,
    *,
    base_num_frames: int | None = None,
    ar_step: int = 0,
    num_prefix: int = 0,
    causal_block_size: int = 1,
  ) -> ForcingPlan:
    base = num_frames if base_num_frames is None else min(base_num_frames, num_frames)
    if not 0 <= num_prefix < num_frames:
      raise ValueError(f"num_prefix={num_prefix} must be in [0, num_frames={num_frames})")
    whole = num_prefix - num_prefix % causal_block_size
    sm, si, um, vi = timestep_matrix(num_frames, step_template, base, ar_step, whole, causal_block_size)
    sm, si, um = sm.copy(), si.copy(), um.copy()
    sm[:, whole:num_prefix] = 0
    si[:, whole:num_prefix] = len(np.asarray(step_template).reshape(-1)) + 1
    um[:, whole:num_prefix] = False
    # Every interval is exactly min(base, num_frames) frames wide (the window end starts at base and the start trails
    # it by base), so each row runs the model on the same static shape.
    window = base
    if len(vi) and not np.all(vi[:, 1] - vi[:, 0] == window):
      raise AssertionError(f"timestep_matrix produced intervals of varying width: {vi.tolist()}")
    return cls(sm, si, um, vi, window, num_prefix)

  @property
  def num_rows(self) -> int:
    return int(self.step_matrix.shape[0])

  @property
  def num_frames(self) -> int:
    return int(self.step_matrix.shape[1])


ApplyFn = Callable[..., jax.Array]  # apply_fn(variables, x [B, W, ...], t [B, W] float, context) -> v [B, W, ...]


def make_denoiser(
  apply_fn: ApplyFn,
  plan: ForcingPlan,
  solver: Any,
  *,
  guidance_scale: float = 1.0,
  addnoise_condition: float = 0.0,
) -> Callable[..., jax.Array]:
  """The whole row loop of one clip as a function (jit it): ``fn(variables, latents, context, negative_context,
  key) -> latents``.

  ``latents`` [B, F, ...] holds the clean prefix in its first ``plan.num_prefix`` frames and noise elsewhere.
  Each row r (a ``lax.scan`` step): cut the window [s_r, s_r + W); feed frame f the timestep step_matrix[r, f];
  re-noise prefix frames to sigma = a / 1000 and feed them t = a when ``addnoise_condition`` a > 0 (the stored prefix
  stays clean); run the model once, or on [context; negative_context] as one doubled batch when
  ``guidance_scale`` g > 1, giving v = v_u + g (v_c - v_u); step the solver of every frame whose update flag is set,
  at its own step index - 1.
  """
  if plan.num_rows == 0:
    raise ValueError("the plan has no rows (every frame is already done)")
  if addnoise_condition < 0:
    raise ValueError(f"addnoise_condition must be >= 0, got {addnoise_condition}")
  window, num_prefix = plan.window, plan.num_prefix
  rows = (
    jnp.asarray(plan.step_matrix, jnp.float32),
    jnp.asarray(plan.step_index - 1, jnp.int32),
    jnp.asarray(plan.update_mask),
    jnp.asarray(plan.valid_interval[:, 0], jnp.int32),
    jnp.arange(plan.num_rows, dtype=jnp.int32),
  )
  use_cfg = guidance_scale > 1.0
  noise_level = addnoise_condition / 1000.0

  def denoise(variables, latents, context, negative_context, key):
    if latents.shape[1] != plan.num_frames:
      raise ValueError(f"latents have {latents.shape[1]} frames, the plan {plan.num_frames}")
    if use_cfg and negative_context is None:
      raise ValueError(f"guidance_scale={guidance_scale} > 1 needs a negative_context")
    batch = latents.shape[0]

    def row(carry, xs):
      x, state = carry
      t_row, k_row, upd_row, start, r = xs
      x_in = jax.lax.dynamic_slice_in_dim(x, start, window, axis=1)  # [b, w, ...]
      t_in = jnp.broadcast_to(jax.lax.dynamic_slice_in_dim(t_row, start, window)[None], (batch, window))
      if noise_level > 0 and num_prefix > 0:
        is_prefix = (start + jnp.arange(window)) < num_prefix  # [w]
        eps = jax.random.normal(jax.random.fold_in(key, r), x_in.shape, jnp.float32)
        noised = ((1.0 - noise_level) * x_in.astype(jnp.float32) + noise_level * eps).astype(x_in.dtype)
        x_in = jnp.where(is_prefix.reshape((1, -1) + (1,) * (x.ndim - 2)), noised, x_in)
        t_in = jnp.where(is_prefix[None], jnp.float32(addnoise_condition), t_in)
      if use_cfg:
        both = apply_fn(
          variables,
          jnp.concatenate([x_in, x_in]),
          jnp.concatenate([t_in, t_in]),
          jnp.concatenate([context, negative_context]),
        )
        cond, uncond = both[:batch].astype(jnp.float32), both[batch:].astype(jnp.float32)
        v_win = uncond + guidance_scale * (cond - uncond)
      else:
        v_win = apply_fn(variables, x_in, t_in, context).astype(jnp.float32)
      # The solver runs on all frames (elementwise, cheap next to the model); frames outside the window do not step.
      v = jax.lax.dynamic_update_slice_in_dim(jnp.zeros(x.shape, jnp.float32), v_win, start, axis=1)
      in_window = (jnp.arange(x.shape[1]) >= start) & (jnp.arange(x.shape[1]) < start + window)
      x, state = solver.step(state, x, v, k_row, upd_row & in_window)
      return (x, state), None

    (out, _), _ = jax.lax.scan(row, (latents, solver.init(latents)), rows)
    return out

  return denoise
