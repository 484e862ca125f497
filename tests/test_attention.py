"""dot_product_attention against a float64 numpy reference, for every mask kind, fully masked rows included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cinema_jax.attention import best_implementation, dot_product_attention, masks
from tests.test_masks import random_masks


def numpy_attention(q, k, v, visible, scale):
  """float64 reference: visible [B|1, Lq, Lkv] bool; a row with no visible key gives zeros."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  vis = np.broadcast_to(np.asarray(visible)[:, None], logits.shape)
  out = np.zeros(q.shape[:3] + (v.shape[-1],))
  for b, h, i in np.ndindex(*logits.shape[:3]):
    sel = vis[b, h, i]
    if not sel.any():
      continue
    z = logits[b, h, i][sel]
    p = np.exp(z - z.max())
    out[b, i, h] = (p / p.sum()) @ v[b, sel, h]
  return out


def make_qkv(seed, b, lq, lkv, h, d, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (b, lq, h, d), dtype)
  k = jax.random.normal(keys[1], (b, lkv, h, d), dtype)
  v = jax.random.normal(keys[2], (b, lkv, h, d), dtype)
  return q, k, v


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.parametrize("lq,lkv", [(24, 24), (19, 31)])
def test_xla_matches_float64_reference_for_every_mask(lq, lkv):
  rng = np.random.default_rng(lq + lkv)
  batch = 2
  zoo = random_masks(rng, lq, lkv)
  zoo.update(
    {f"per_sample/{k}": v for k, v in random_masks(rng, lq, lkv, batch=batch).items() if v.batch_size is not None}
  )
  zoo["none"] = None
  q, k, v = make_qkv(7, batch, lq, lkv, 3, 16)
  scale = 0.3
  fn = jax.jit(
    lambda q, k, v, m: dot_product_attention(q, k, v, mask=m, scale=scale, implementation="xla"), static_argnums=3
  )
  seen_masked_row = False
  for name, mask in zoo.items():
    visible = np.ones((1, lq, lkv), bool) if mask is None else np.asarray(mask.to_dense(lq, lkv))
    visible = visible if visible.ndim == 3 else visible[None]
    out = fn(q, k, v, mask)
    ref = numpy_attention(q, k, v, visible, scale)
    assert out.dtype == jnp.float32
    # Per element, relative to the output scale: rows differ a lot in magnitude.
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5, err_msg=name)
    dead = ~np.broadcast_to(visible, (batch, lq, lkv)).any(-1)  # [b, q]
    if dead.any():
      seen_masked_row = True
      assert np.all(np.asarray(out)[dead] == 0.0), name
  assert seen_masked_row  # the zoo must exercise fully masked rows


def test_fully_masked_rows_return_zeros_and_finite_grads():
  q, k, v = make_qkv(1, 1, 4, 4, 2, 8)
  mask = masks.SegmentMask(np.array([0, 0, 1, -1]), np.array([0, 0, 2, 2]))  # rows 2 and 3 see nothing
  out = dot_product_attention(q, k, v, mask=mask, implementation="xla")
  assert np.all(np.asarray(out[:, 2:]) == 0.0)
  assert np.all(np.abs(np.asarray(out[:, :2])) > 0)

  def loss(q, k, v):
    return jnp.sum(dot_product_attention(q, k, v, mask=mask, implementation="xla") ** 2)

  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  # Keys 2 and 3 are seen by nobody: no gradient flows into them.
  assert np.all(np.asarray(grads[1][:, 2:]) == 0.0)
  assert np.all(np.asarray(grads[2][:, 2:]) == 0.0)


def test_gradients_match_finite_differences_of_reference():
  q, k, v = make_qkv(2, 1, 6, 6, 1, 4)
  mask = masks.BlockCausalMask(np.array([0, 0, 1, 1, 2, 2]))

  def loss(q):
    return jnp.sum(jnp.sin(dot_product_attention(q, k, v, mask=mask, implementation="xla")))

  g = np.asarray(jax.grad(loss)(q))
  eps = 1e-3
  qn = np.asarray(q, np.float64)
  vis = np.asarray(mask.to_dense())[None]
  for idx in [(0, 0, 0, 0), (0, 3, 0, 2), (0, 5, 0, 1)]:
    plus, minus = qn.copy(), qn.copy()
    plus[idx] += eps
    minus[idx] -= eps
    fd = (
      np.sin(numpy_attention(plus, k, v, vis, 0.5)).sum() - np.sin(numpy_attention(minus, k, v, vis, 0.5)).sum()
    ) / (2 * eps)
    assert g[idx] == pytest.approx(fd, rel=1e-3, abs=1e-4)


def test_bf16_inputs_use_float32_softmax():
  q, k, v = make_qkv(3, 1, 32, 32, 2, 16, jnp.bfloat16)
  mask = masks.SegmentMask(np.repeat(np.arange(4), 8).astype(np.int32))
  out = dot_product_attention(q, k, v, mask=mask, implementation="xla")
  assert out.dtype == jnp.bfloat16
  ref = numpy_attention(
    q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), np.asarray(mask.to_dense())[None], 16**-0.5
  )
  assert rel_err(out, ref) < 2e-2


def test_default_scale_and_full_mask_equal_no_mask():
  q, k, v = make_qkv(4, 2, 8, 8, 2, 8)
  a = dot_product_attention(q, k, v)
  b = dot_product_attention(q, k, v, mask=masks.FullMask(), scale=8**-0.5, implementation="xla")
  np.testing.assert_allclose(a, b, rtol=1e-6)


def test_cudnn_needs_a_gpu():
  if jax.default_backend() != "gpu":
    q, k, v = make_qkv(5, 1, 8, 8, 2, 8, jnp.bfloat16)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
      dot_product_attention(q, k, v, implementation="cudnn")
    pytest.skip(f"cuDNN attention needs a CUDA GPU; this run's JAX backend is {jax.default_backend()!r}")
  q, k, v = make_qkv(5, 2, 128, 128, 4, 64, jnp.bfloat16)
  mask = masks.SegmentMask(np.repeat(np.arange(4), 32).astype(np.int32)) & masks.BlockCausalMask(
    np.concatenate([np.repeat(np.arange(4), 30), -np.ones(8, int)]).astype(np.int32)
  )
  for m in (None, mask):
    out = dot_product_attention(q, k, v, mask=m, implementation="cudnn")
    ref = dot_product_attention(q, k, v, mask=m, implementation="xla")
    assert rel_err(out, ref) < 2e-2


def test_dispatch_choices_and_errors():
  q, k, v = make_qkv(6, 1, 8, 8, 2, 8)
  if jax.default_backend() == "cpu":
    assert best_implementation(q, None) == "xla"
  with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
    dot_product_attention(q, k, v, implementation="flash")
  with pytest.raises(TypeError, match="DenseMask"):
    dot_product_attention(q, k, v, mask=np.ones((8, 8), bool))
  with pytest.raises(ValueError, match=r"\[B, L, H, D\]"):
    dot_product_attention(q[0], k, v)
  with pytest.raises(ValueError, match="must agree"):
    dot_product_attention(q[..., :4], k, v)
  with pytest.raises(ValueError, match="per-sample ids for batch 3"):
    dot_product_attention(q, k, v, mask=masks.SegmentMask(np.zeros((3, 8), np.int32)))
