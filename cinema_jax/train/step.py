"""The pure train step: loss and gradients (accumulated over micro-batches), optimiser update, EMA, norms.

Jitted with the state's shardings in and out and the state donated, so parameters and Adam moments are updated in
place and one compiled program serves every step of a stage. The step's randomness is ``fold_in(key, step)``
(and the micro-batch index): a resumed run draws exactly the numbers an uninterrupted one would.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from cinema_jax.parallel import axes
from cinema_jax.parallel.sharding import named_sharding
from cinema_jax.train.optimizer import ema_update
from cinema_jax.train.state import TrainState


def batch_shardings(batch: dict, mesh, rules) -> dict:
  """Leading axis over the batch axes of the mesh (``ACT_BATCH``), the rest replicated."""
  return {
    name: named_sharding((axes.ACT_BATCH,) + (None,) * (value.ndim - 1), mesh, rules) for name, value in batch.items()
  }


def _micro_batches(batch: dict, accum: int) -> dict:
  # Sample j of micro-batch i is sample j * accum + i: every device keeps its own samples (no reshuffle across the
  # batch sharding), and a micro-batch holds samples from all devices.
  def split(x):
    if x.shape[0] % accum:
      raise ValueError(f"batch of {x.shape[0]} does not split into train.grad_accum_steps={accum} micro-batches")
    return jnp.swapaxes(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 0, 1)  # [a, b/a, ...]

  return jax.tree.map(split, batch)


def make_step_fn(task, config, tx: optax.GradientTransformation):
  """The un-jitted step ``(state, batch) -> (state, metrics)``."""
  accum = int(config.train.grad_accum_steps)
  ema_decay = float(config.optimizer.ema_decay)
  base_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)  # init used the plain seed key

  grad_fn = jax.value_and_grad(task.loss, has_aux=True)

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(base_key, state.step)
    if accum == 1:
      (loss, _), grads = grad_fn(state.params, batch, key)
    else:
      zeros = jax.tree.map(jnp.zeros_like, state.params)

      def body(carry, inputs):
        i, micro = inputs
        (micro_loss, _), g = grad_fn(state.params, micro, jax.random.fold_in(key, i))
        return (carry[0] + micro_loss, jax.tree.map(jnp.add, carry[1], g)), None

      (loss, grads), _ = jax.lax.scan(
        body, (jnp.zeros((), jnp.float32), zeros), (jnp.arange(accum), _micro_batches(batch, accum))
      )
      loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = ema_update(state.ema, params, ema_decay) if state.ema is not None else None
    metrics = {
      "loss": loss,
      "grad_norm": optax.tree.norm(grads),
      "param_norm": optax.tree.norm(params),
      "update_norm": optax.tree.norm(updates),
    }
    return TrainState(state.step + 1, params, opt_state, ema), metrics

  return step


def jit_step(task, config, tx, state_shardings: TrainState, batch_sharding: dict):
  """The step jitted with in/out shardings, the state donated."""
  return jax.jit(
    make_step_fn(task, config, tx),
    in_shardings=(state_shardings, batch_sharding),
    out_shardings=(state_shardings, None),
    donate_argnums=(0,),
  )
