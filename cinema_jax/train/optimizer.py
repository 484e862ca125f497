"""The optimiser: AdamW with warm-up + cosine/constant schedule, clipping, frozen parameters; and the EMA.

Frozen parameters go through ``optax.set_to_zero`` inside ``optax.multi_transform``, so their updates are exactly
zero (not merely small: no weight decay, no Adam epsilon) and they hold no Adam moments. Clipping and weight decay
act on the trainable group only, so a frozen branch neither shrinks nor counts towards the clipped norm.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import optax

SCHEDULES = ("cosine", "constant")


def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warm-up from 0 to ``learning_rate`` over ``warmup_steps``, then cosine decay to
  ``learning_rate * end_factor`` at ``decay_steps`` (``cosine``) or flat (``constant``)."""
  o = config.optimizer
  if o.schedule not in SCHEDULES:
    raise ValueError(f"unknown learning-rate schedule {o.schedule!r}; choose one of {', '.join(SCHEDULES)}")
  warmup = optax.linear_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1))
  if o.schedule == "constant":
    after = optax.constant_schedule(o.learning_rate)
  else:
    total = o.decay_steps if o.decay_steps > 0 else total_steps(config)
    after = optax.cosine_decay_schedule(o.learning_rate, max(total - o.warmup_steps, 1), alpha=o.end_factor)
  return optax.join_schedules([warmup, after], [o.warmup_steps])


def total_steps(config) -> int:
  """Sum of the stage lengths (``train.stages``)."""
  return int(sum(config.train.stage_steps))


def path_name(path: Sequence[Any]) -> str:
  """``double_blocks/img_attn/qkv/kernel`` from a jax key path."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def parameter_labels(params: Any, frozen: Sequence[str]) -> Any:
  """ "frozen" for every parameter whose path matches one of the ``frozen`` regexes (re.search), else "train"."""
  patterns = [re.compile(p) for p in frozen]

  def label(path, _):
    name = path_name(path)
    return "frozen" if any(p.search(name) for p in patterns) else "train"

  return jax.tree_util.tree_map_with_path(label, params)


def _decay_mask(params: Any) -> Any:
  # Matrices decay; biases, norm scales and embeddings' 1-D vectors do not (the usual AdamW practice).
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config, params: Any) -> optax.GradientTransformation:
  """AdamW for the trainable group, ``set_to_zero`` for ``optimizer.frozen``; labels come from ``params``' paths."""
  o = config.optimizer
  labels = parameter_labels(params, tuple(o.frozen))
  if o.frozen and all(label == "frozen" for label in jax.tree.leaves(labels)):
    raise ValueError(f"optimizer.frozen={tuple(o.frozen)} freezes every parameter; nothing would train")
  train = optax.chain(
    optax.clip_by_global_norm(o.clip_norm) if o.clip_norm > 0 else optax.identity(),
    optax.adamw(
      learning_rate_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=_decay_mask
    ),
  )
  return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)


def ema_update(ema: Any, params: Any, decay: float) -> Any:
  """``ema <- decay * ema + (1 - decay) * params`` in float32."""
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype), ema, params)
