"""Flow-matching solvers with one step state per frame: UniPC (order 2, B(h) = bh2, x0 prediction) and Euler.

Legend: B batch, F frames, ``...`` the rest of a frame (rows, cols, channels), N steps, k a frame's own step
counter (0 .. N-1).

Schedule (diffusers ``UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
flow_shift=s)``): sigma_i = s u_i / (1 + (s - 1) u_i) for u = linspace(1, 1/1000, N + 1)[:N] (the first one nudged
below 1 by 1e-6), then sigma_N = 0; the model is fed timestep int(1000 sigma_i). Flow: x_sigma = (1 - sigma) x0 +
sigma eps, the model predicts v = eps - x0, so x0 = x - sigma v; alpha = 1 - sigma and lambda = log(alpha / sigma).

UniPC in its data-prediction form, for a frame at step k with sample x_k, prediction m_k = x0(x_k) and h_k =
lambda_{k+1} - lambda_k (phi = expm1(-h), B(h) = expm1(-h) for bh2):

  predictor (order p_k = min(2, N - k, k + 1)):
    x_{k+1} = (sigma_{k+1}/sigma_k) x_k - alpha_{k+1} phi m_k - alpha_{k+1} B(h) rho_p D_k
    with D_k = (m_{k-1} - m_k) / r_k, r_k = (lambda_{k-1} - lambda_k) / h_k, rho_p = 1/2 (only for p_k = 2)
  corrector at step k >= 1 (order p_{k-1}, applied to x_k before it is used):
    x_k <- (sigma_k/sigma_{k-1}) x_{k-1} - alpha_k phi m_{k-1} - alpha_k B(h) (rho_0 D + rho_1 (m_k - m_{k-1}))
    with (rho_0, rho_1) solving UniC's 2 x 2 system (order 2) or rho_1 = 1/2 (order 1).

Every coefficient depends only on the step index k, so they are tabulated on the host (float64 from the float32
sigmas) and gathered per frame: one vectorised update moves all frames, each at its own step, and frames whose update
flag is off keep their sample and history. The update is linear in (x_k, m_k, m_{k-1}, m_{k-2}, x_{k-1}):

  corrected x = c_last x_{k-1} + c_m1 m_{k-1} + c_m2 m_{k-2} + c_x0 m_k      (k >= 1; else x)
  x_{k+1}     = p_x x + p_x0 m_k + p_m1 m_{k-1}

Euler: x_{k+1} = x_k + (sigma_{k+1} - sigma_k) v_k.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000


def flow_sigmas(num_steps: int, shift: float = 1.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
  """(sigmas float32 [N + 1] ending in 0, timesteps int64 [N]) of the shifted flow schedule (see module doc)."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  if shift <= 0:
    raise ValueError(f"flow shift must be > 0, got {shift}")
  u = np.linspace(1.0, 1.0 / num_train_timesteps, num_steps + 1)[:-1]
  sigmas = shift * u / (1.0 + (shift - 1.0) * u)
  if abs(sigmas[0] - 1.0) < 1e-6:
    sigmas[0] -= 1e-6  # keeps log(alpha) finite at the first step
  timesteps = (sigmas * num_train_timesteps).astype(np.int64)
  return np.concatenate([sigmas, [0.0]]).astype(np.float32), timesteps


class SolverState(NamedTuple):
  """Per-frame history: the sample before the last predictor step and the last two x0 predictions."""

  last_sample: jax.Array  # x_{k-1} [B, F, ...]
  m1: jax.Array  # m_{k-1}
  m2: jax.Array  # m_{k-2}


def _gather(table: jax.Array, k: jax.Array, ndim: int) -> jax.Array:
  """table[k] for per-frame k [F], shaped [1, F, 1, ...] to broadcast against [B, F, ...] of rank ``ndim``."""
  return jnp.take(table, k).reshape((1, -1) + (1,) * (ndim - 2))


@dataclasses.dataclass(frozen=True)
class FlowUniPC:
  """UniPC multistep (bh2, x0 prediction) for flow models, vectorised over frames with per-frame step counters.

  Build with ``FlowUniPC.create(num_steps, shift)``. ``timesteps`` is the step template for
  ``forcing.timestep_matrix``; ``step(state, x, v, k, update)`` advances every frame f with ``update[f]`` from its
  step ``k[f]`` using velocity ``v``.
  """

  sigmas: np.ndarray  # float32 [N + 1]
  timesteps: np.ndarray  # int64 [N]
  order: int
  coefficients: dict[str, np.ndarray]  # name -> float32 [N]

  @classmethod
  def create(cls, num_steps: int, shift: float = 1.0, order: int = 2) -> FlowUniPC:
    if order not in (1, 2):
      raise ValueError(f"FlowUniPC supports solver order 1 or 2, got {order}")
    sigmas, timesteps = flow_sigmas(num_steps, shift)
    return cls(sigmas, timesteps, order, _unipc_tables(sigmas.astype(np.float64), order))

  @property
  def num_steps(self) -> int:
    return len(self.timesteps)

  def init(self, x: jax.Array) -> SolverState:
    zeros = jnp.zeros_like(x)
    return SolverState(zeros, zeros, zeros)

  def step(self, state: SolverState, x: jax.Array, v: jax.Array, k: jax.Array, update: jax.Array):
    """One step for the frames with ``update`` [F]: returns (x', state'). x, v [B, F, ...]; k int [F]."""
    c = {name: jnp.asarray(t) for name, t in self.coefficients.items()}
    k = jnp.clip(jnp.asarray(k, jnp.int32), 0, self.num_steps - 1)
    g = lambda name: _gather(c[name], k, x.ndim)  # noqa: E731
    x32, v32 = x.astype(jnp.float32), v.astype(jnp.float32)
    last, m1, m2 = (s.astype(jnp.float32) for s in state)
    sigma = _gather(jnp.asarray(self.sigmas), k, x.ndim)
    x0 = x32 - sigma * v32  # m_k (from the uncorrected sample, as UniPC converts before correcting)
    started = (k > 0).reshape((1, -1) + (1,) * (x.ndim - 2))
    corrected = g("c_last") * last + g("c_m1") * m1 + g("c_m2") * m2 + g("c_x0") * x0
    xc = jnp.where(started, corrected, x32)
    x_next = g("p_x") * xc + g("p_x0") * x0 + g("p_m1") * m1
    upd = jnp.asarray(update, bool).reshape((1, -1) + (1,) * (x.ndim - 2))
    new_state = SolverState(
      jnp.where(upd, xc, last).astype(state.last_sample.dtype),
      jnp.where(upd, x0, m1).astype(state.m1.dtype),
      jnp.where(upd, m1, m2).astype(state.m2.dtype),
    )
    return jnp.where(upd, x_next, x32).astype(x.dtype), new_state


@dataclasses.dataclass(frozen=True)
class FlowEuler:
  """Euler for flow models with per-frame step counters: x_{k+1} = x_k + (sigma_{k+1} - sigma_k) v."""

  sigmas: np.ndarray
  timesteps: np.ndarray

  @classmethod
  def create(cls, num_steps: int, shift: float = 1.0) -> FlowEuler:
    return cls(*flow_sigmas(num_steps, shift))

  @property
  def num_steps(self) -> int:
    return len(self.timesteps)

  def init(self, x: jax.Array) -> tuple:
    return ()

  def step(self, state: tuple, x: jax.Array, v: jax.Array, k: jax.Array, update: jax.Array):
    k = jnp.clip(jnp.asarray(k, jnp.int32), 0, self.num_steps - 1)
    dsigma = jnp.asarray(np.diff(self.sigmas))  # [n]: sigma_{k+1} - sigma_k
    upd = jnp.asarray(update, bool).reshape((1, -1) + (1,) * (x.ndim - 2))
    x_next = x.astype(jnp.float32) + _gather(dsigma, k, x.ndim) * v.astype(jnp.float32)
    return jnp.where(upd, x_next, x.astype(jnp.float32)).astype(x.dtype), state


SOLVERS = {"unipc": FlowUniPC, "euler": FlowEuler}


def make_solver(name: str, num_steps: int, shift: float) -> Any:
  """A per-frame solver by name: 'unipc' or 'euler'."""
  if name not in SOLVERS:
    raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
  return SOLVERS[name].create(num_steps, shift)


# ----------------------------------------------------------------------------------------------------------------
# coefficient tables


def _step_order(j: int, n: int, order: int) -> int:
  """UniPC's order at step j: warm-up (j + 1), the solver order, and lower order on the last steps."""
  return min(order, n - j, j + 1)


def _unipc_tables(sigmas: np.ndarray, order: int) -> dict[str, np.ndarray]:
  n = len(sigmas) - 1
  alpha = 1.0 - sigmas
  with np.errstate(divide="ignore"):
    lam = np.log(alpha) - np.log(sigmas)  # +inf at sigma = 0
  names = ("p_x", "p_x0", "p_m1", "c_last", "c_m1", "c_m2", "c_x0")
  t = {name: np.zeros(n) for name in names}
  for k in range(n):
    # Predictor from step k to k + 1.
    p = _step_order(k, n, order)
    if sigmas[k + 1] == 0.0:  # the last step lands on x0: h = inf, phi = -1, sigma_{k+1} = 0
      t["p_x"][k], t["p_x0"][k] = 0.0, alpha[k + 1]
    else:
      h = lam[k + 1] - lam[k]
      phi = math.expm1(-h)
      bh = phi  # bh2
      t["p_x"][k] = sigmas[k + 1] / sigmas[k]
      t["p_x0"][k] = -alpha[k + 1] * phi
      if p == 2:
        rk = (lam[k - 1] - lam[k]) / h
        w = alpha[k + 1] * bh * 0.5 / rk  # coefficient of D = (m_{k-1} - m_k) / r_k, times -1
        t["p_x0"][k] += w
        t["p_m1"][k] = -w
    # Corrector of x_k using the model output at x_k (k >= 1), with the previous step's order.
    if k == 0:
      continue
    q = _step_order(k - 1, n, order)
    h = lam[k] - lam[k - 1]
    phi = math.expm1(-h)
    bh = phi
    t["c_last"][k] = sigmas[k] / sigmas[k - 1]
    t["c_m1"][k] = -alpha[k] * phi
    if q == 1:
      rho1, rho0, rk = 0.5, 0.0, 1.0
    else:
      rk = (lam[k - 2] - lam[k - 1]) / h
      hh = -h
      b1 = (phi / hh - 1.0) / bh
      b2 = ((phi / hh - 1.0) / hh - 0.5) * 2.0 / bh
      rho0 = (b1 - b2) / (1.0 - rk)
      rho1 = b1 - rho0
    # - alpha_k B(h) (rho0 (m_{k-2} - m_{k-1}) / r + rho1 (m_k - m_{k-1}))
    s = alpha[k] * bh
    t["c_m2"][k] = -s * rho0 / rk
    t["c_m1"][k] += s * rho0 / rk + s * rho1
    t["c_x0"][k] = -s * rho1
  return {name: v.astype(np.float32) for name, v in t.items()}
