"""Videos of any length by diffusion-forcing rollout: fixed-size windows, each continuing the last from its tail.

Legend: B batch, W = base_num_frames latent frames per window, O = overlap_history frames carried over, P0 image
prefix frames of the first window, (H, W_l, C) latent rows, cols and channels, n windows.

Window i >= 1 starts from the last O latent frames of window i - 1 as its clean prefix (kept in latent space, never
decoded and re-encoded) and W - O fresh noise frames; window 0 starts from pure noise or from an image prefix.
Every window runs the same compiled row loop (``forcing.make_denoiser``) on the same shapes, so memory per window is
constant and compute is linear in n; only the O carried frames cross from one window to the next. Frames are
yielded as soon as their window finishes: all W frames of window 0, then W - O new frames per window, for
W + (n - 1)(W - O) frames in all. Each window may have its own prompt (prompt travel).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from cinema_jax.diffusion import forcing, unipc
from cinema_jax.models.video_dit import fps_class


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
  """What a rollout needs besides the model; ``from_config`` reads the ``sampling`` section of configs/video.py."""

  base_num_frames: int  # W latent frames per window
  overlap_history: int  # O latent frames carried into the next window as its clean prefix
  num_steps: int = 30  # solver steps per frame
  shift: float = 8.0  # flow shift of the sigma schedule
  solver: str = "unipc"  # unipc | euler
  guidance_scale: float = 6.0  # CFG scale; <= 1 runs the conditional pass only
  ar_step: int = 0  # 0 synchronous, > 0 asynchronous (blocks lag by ar_step steps)
  causal_block_size: int = 1  # frames per block of the timestep matrix
  addnoise_condition: float = 0.0  # prefix frames re-noised to sigma = a / 1000, fed t = a

  @classmethod
  def from_config(cls, sampling: ml_collections.ConfigDict) -> RolloutSettings:
    return cls(
      base_num_frames=sampling.base_num_frames,
      overlap_history=sampling.overlap_history,
      num_steps=sampling.num_steps,
      shift=sampling.shift,
      solver=sampling.solver,
      guidance_scale=sampling.guidance_scale,
      ar_step=sampling.ar_step,
      causal_block_size=sampling.causal_block_size,
      addnoise_condition=sampling.addnoise_condition,
    )

  def __post_init__(self):
    if self.base_num_frames < 1:
      raise ValueError(f"base_num_frames must be >= 1, got {self.base_num_frames}")
    if not 0 <= self.overlap_history < self.base_num_frames:
      raise ValueError(f"overlap_history={self.overlap_history} must be in [0, base_num_frames={self.base_num_frames})")

  def total_frames(self, num_windows: int) -> int:
    """Latent frames produced by ``num_windows`` windows: W + (n - 1)(W - O)."""
    return self.base_num_frames + (num_windows - 1) * (self.base_num_frames - self.overlap_history)

  def windows_for(self, num_frames: int) -> int:
    """The fewest windows that produce at least ``num_frames`` latent frames."""
    extra = max(0, num_frames - self.base_num_frames)
    return 1 + -(-extra // (self.base_num_frames - self.overlap_history))


def video_dit_apply(module: Any, fps: int | None = None) -> Callable[..., jax.Array]:
  """``apply_fn(variables, x, t, context)`` for a ``VideoDiT``; ``fps`` (a frame rate) feeds its fps embedding."""
  fps_id = None if fps is None else fps_class(fps)
  if getattr(module, "fps_embedding", False) and fps_id is None:
    raise ValueError("this model has an fps embedding: pass fps (the frame rate, e.g. 24)")

  def apply_fn(variables, x, t, context):
    ids = None if fps_id is None else jnp.full((x.shape[0],), fps_id, jnp.int32)
    return module.apply(variables, x, t, context, ids)

  return apply_fn


def _per_window(source: Any, what: str) -> Callable[[int], Any] | Iterator[Any] | None:
  """Prompt source -> a callable i -> context, or an iterator (consumed one per window), or None."""
  if source is None:
    return None
  if callable(source):
    return source
  if hasattr(source, "shape"):  # one context for every window
    return lambda i: source
  if isinstance(source, Sequence):
    if not source:
      raise ValueError(f"{what} is an empty sequence")
    return lambda i: source[min(i, len(source) - 1)]  # the last prompt holds for the remaining windows
  if hasattr(source, "__next__"):
    return source
  raise TypeError(f"{what} must be an array, a sequence of arrays, a callable window -> array or an iterator")


class LongVideoSampler:
  """Rollout of a diffusion-forcing model, window by window, with constant memory per window.

  ``apply_fn(variables, x [B, W, H, W_l, C], t [B, W], context) -> v`` is the model (see ``video_dit_apply``);
  ``latent_shape`` = (H, W_l, C).
  """

  def __init__(
    self,
    apply_fn: Callable[..., jax.Array],
    variables: Any,
    settings: RolloutSettings,
    *,
    latent_shape: tuple[int, int, int],
  ):
    self.apply_fn = apply_fn
    self.variables = variables
    self.settings = settings
    self.latent_shape = tuple(latent_shape)
    self.solver = unipc.make_solver(settings.solver, settings.num_steps, settings.shift)
    self._compiled: dict[int, Callable] = {}

  def plan(self, num_prefix: int) -> forcing.ForcingPlan:
    s = self.settings
    return forcing.ForcingPlan.create(
      s.base_num_frames,
      self.solver.timesteps,
      ar_step=s.ar_step,
      num_prefix=num_prefix,
      causal_block_size=s.causal_block_size,
    )

  def window_fn(self, num_prefix: int) -> Callable[..., jax.Array]:
    """The jitted per-window step ``fn(variables, latents, context, negative_context, key) -> latents``.

    Compiled once per prefix length (the first window's and the overlap's): every later window reuses it.
    """
    if num_prefix not in self._compiled:
      s = self.settings
      fn = forcing.make_denoiser(
        self.apply_fn,
        self.plan(num_prefix),
        self.solver,
        guidance_scale=s.guidance_scale,
        addnoise_condition=s.addnoise_condition,
      )
      self._compiled[num_prefix] = jax.jit(fn)
    return self._compiled[num_prefix]

  def stream(
    self,
    prompts: Any,
    *,
    negative_prompts: Any = None,
    num_windows: int | None = None,
    image_prefix: jax.Array | None = None,
    key: jax.Array | None = None,
    batch: int | None = None,
    progress: bool = True,
  ) -> Iterator[np.ndarray]:
    """Yields latent frames [B, n_i, H, W_l, C] (numpy) window by window: W, then W - O per window.

    ``prompts`` / ``negative_prompts``: one context [B, T, D] for all windows, a sequence (window i takes item i, the
    last holds after), a callable i -> context, or an iterator (one item per window; the rollout ends with it).
    ``num_windows`` None runs as long as the prompts last (forever for an array or a callable).
    ``image_prefix`` [B, P0, H, W_l, C]: clean latent frames that open the first window (P0 < W).
    """
    s = self.settings
    get_prompt = _per_window(prompts, "prompts")
    get_negative = _per_window(negative_prompts, "negative_prompts")
    if get_prompt is None:
      raise ValueError("prompts are required (a text context per window)")
    if s.guidance_scale > 1.0 and get_negative is None:
      raise ValueError(f"guidance_scale={s.guidance_scale} > 1 needs negative_prompts")
    key = jax.random.key(0) if key is None else key
    num_prefix0 = 0
    if image_prefix is not None:
      image_prefix = jnp.asarray(image_prefix)
      num_prefix0 = image_prefix.shape[1]
      if image_prefix.shape[2:] != self.latent_shape or not 0 < num_prefix0 < s.base_num_frames:
        raise ValueError(
          f"image_prefix must be [B, P0, {', '.join(map(str, self.latent_shape))}] with 0 < P0 < "
          f"{s.base_num_frames}, got {tuple(image_prefix.shape)}"
        )
      batch = image_prefix.shape[0] if batch is None else batch

    def next_item(source, i):
      if source is None:
        return None
      return source(i) if callable(source) else next(source)

    shape = (s.base_num_frames,) + self.latent_shape
    carried = None
    windows = range(num_windows) if num_windows is not None else itertools.count()
    with tqdm(windows, total=num_windows, desc="windows", unit="window", disable=not progress) as bar:
      for i in bar:
        try:
          context = jnp.asarray(next_item(get_prompt, i))
          negative = next_item(get_negative, i)
        except StopIteration:
          return
        b = context.shape[0] if batch is None else batch
        noise = jax.random.normal(jax.random.fold_in(key, i), (b,) + shape, jnp.float32)
        if i == 0:
          latents, num_prefix = noise, num_prefix0
          if num_prefix0:
            latents = latents.at[:, :num_prefix0].set(image_prefix.astype(jnp.float32))
        else:
          latents, num_prefix = noise.at[:, : s.overlap_history].set(carried), s.overlap_history
        out = self.window_fn(num_prefix)(
          self.variables,
          latents,
          context,
          None if negative is None else jnp.asarray(negative),
          jax.random.fold_in(key, 1_000_003 + i),
        )
        carried = out[:, s.base_num_frames - s.overlap_history :]
        fresh = out if i == 0 else out[:, s.overlap_history :]
        yield np.asarray(fresh)

  def generate(self, prompts: Any, *, num_frames: int, **kwargs) -> np.ndarray:
    """All frames at once: enough windows for ``num_frames`` latent frames, trimmed to exactly that many."""
    n = self.settings.windows_for(num_frames)
    chunks = list(self.stream(prompts, num_windows=n, **kwargs))
    return np.concatenate(chunks, axis=1)[:, :num_frames]
