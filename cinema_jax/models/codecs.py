"""Codecs: video frames <-> the latents the denoisers work in.

Legend: F frames, (H, W) pixel rows x cols, (h, w, C) latent rows, cols and channels.

A codec has ``latent_shape`` (h, w, C), ``encode(frames uint8 [..., H, W, 3]) -> float32 [..., h, w, C]`` and
``decode(latents) -> uint8 [..., H', W', 3]``. A real autoencoder (the Flux AE, the Wan VAE) plugs in behind the same
three names. ``PixelCodec`` is the codec of the CPU demo: the latent is the picture itself, area-resized to
(h, w) and scaled from [0, 255] to [-1, 1]; decoding scales back and, when the output size (H', W') differs,
resizes bicubically (meant for upsampling: a smaller output is not low-pass filtered first). Nothing has to be
trained or downloaded. The models' patch size (MM-DiT ``latent.patch``, video DiT ``patch_size``) turns latents into
few tokens. A token must carry its patch's noise through the model's
width (the velocity target contains it): the demo keeps patches of 4 x 4 x 3 = 48 values under a width of 128,
which is why its latent is the picture at half size (32 x 48 for 64 x 96 frames) rather than 8 x 8-pixel patches
of the full picture (192 values per token, more than the width can carry).
"""

from __future__ import annotations

import cv2
import numpy as np

from cinema_jax.models.goldenmem import area_resize


class PixelCodec:
  """Pixels as latents: area resize to (height, width), x / 127.5 - 1; decoded to (out_height, out_width)."""

  channels = 3

  def __init__(self, height: int, width: int, out_height: int | None = None, out_width: int | None = None):
    out_height, out_width = out_height or height, out_width or width
    if min(height, width, out_height, out_width) < 1:
      raise ValueError(
        f"PixelCodec needs positive sizes, got latent {height} x {width}, out {out_height} x {out_width}"
      )
    self.height, self.width = int(height), int(width)
    self.out_height, self.out_width = int(out_height), int(out_width)

  @classmethod
  def from_config(cls, codec) -> PixelCodec:
    """From a config's ``codec`` section (``kind = "pixels"``, ``height``, ``width``, ``out_height``, ``out_width``)."""
    if codec.kind != "pixels":
      raise ValueError(f"codec.kind={codec.kind!r} is not a codec of this project; the CPU codec is 'pixels'")
    return cls(codec.height, codec.width, codec.get("out_height") or None, codec.get("out_width") or None)

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    return self.height, self.width, self.channels

  def encode(self, frames: np.ndarray) -> np.ndarray:  # uint8 [..., H, W, 3] -> float32 [..., h, w, 3]
    frames = np.asarray(frames)
    if frames.ndim < 3 or frames.shape[-1] != 3:
      raise ValueError(f"frames must be [..., H, W, 3] RGB, got shape {frames.shape}")
    x = frames.astype(np.float32) / 127.5 - 1.0
    if frames.shape[-3:-1] != (self.height, self.width):
      lead = x.shape[:-3]
      flat = x.reshape((-1,) + x.shape[-3:])
      x = np.stack([area_resize(f, self.height, self.width) for f in flat]).reshape(lead + self.latent_shape)
    return x.astype(np.float32)

  def decode(self, latents: np.ndarray) -> np.ndarray:  # float [..., h, w, 3] -> uint8 [..., H', W', 3]
    latents = np.asarray(latents, np.float32)
    if latents.shape[-3:] != self.latent_shape:
      raise ValueError(f"latents must be [..., {self.height}, {self.width}, 3], got shape {latents.shape}")
    x = np.clip((np.nan_to_num(latents) + 1.0) * 127.5, 0, 255)  # NaN decodes as mid-grey, never undefined
    if (self.out_height, self.out_width) != (self.height, self.width):
      lead = x.shape[:-3]
      flat = x.reshape((-1,) + self.latent_shape)
      size = (self.out_width, self.out_height)
      x = np.stack([cv2.resize(f, size, interpolation=cv2.INTER_CUBIC) for f in flat])
      x = np.clip(x, 0, 255).reshape(lead + (self.out_height, self.out_width, 3))
    return np.rint(x).astype(np.uint8)
