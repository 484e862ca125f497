"""The demo models' small parts: the trainable text encoder, the pixel codec, parameter export, and the tasks'
text-encoder path (gradients reach the encoder; caption dropout gives the unconditional input)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cinema_jax.config import load_config
from cinema_jax.data.text import get_tokenizer
from cinema_jax.models.codecs import PixelCodec
from cinema_jax.models.text import TextEncoder
from cinema_jax.train import export, tasks


def _encoder(pooled_dim=8):
  return TextEncoder(vocab_size=50, max_length=6, width=16, depth=2, heads=2, states_dim=12, pooled_dim=pooled_dim)


def test_text_encoder_ignores_padding_and_zeroes_it():
  enc = _encoder()
  ids = jnp.array([[1, 7, 9, 2, 0, 0], [1, 7, 9, 2, 0, 0]])
  ids_other_padding = ids.at[1, 4:].set(31)  # same content, garbage in the padded slots
  mask = ids != 0
  params = enc.init(jax.random.key(0), ids, mask)
  states, pooled = enc.apply(params, ids, mask)
  states2, pooled2 = enc.apply(params, ids_other_padding, mask)
  assert states.shape == (2, 6, 12) and pooled.shape == (2, 8)
  np.testing.assert_array_equal(states[:, 4:], 0.0)  # padding states are zero
  np.testing.assert_allclose(states2[1], states[1], atol=1e-6)  # padded ids never leak into real tokens
  np.testing.assert_allclose(pooled2[1], pooled[1], atol=1e-6)
  # Different content gives different states (the encoder reads its input), and order matters (positions).
  swapped, _ = enc.apply(params, jnp.array([[1, 9, 7, 2, 0, 0]]), mask[:1])
  assert np.abs(np.asarray(swapped[0, 1]) - np.asarray(states[0, 1])).max() > 1e-3


def test_text_encoder_without_pooled_head_and_length_check():
  enc = _encoder(pooled_dim=0)
  ids = jnp.array([[1, 5, 2, 0, 0, 0]])
  params = enc.init(jax.random.key(1), ids)
  states, pooled = enc.apply(params, ids)
  assert pooled is None and "pooled_out" not in params["params"]
  with pytest.raises(ValueError, match="7 caption tokens, the text encoder takes at most 6"):
    enc.apply(params, jnp.ones((1, 7), jnp.int32))


def test_pixel_codec_round_trip_and_area_resize():
  codec = PixelCodec(4, 6)
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 256, size=(2, 3, 4, 6, 3), dtype=np.uint8)
  latents = codec.encode(frames)
  assert latents.shape == (2, 3, 4, 6, 3) and latents.min() >= -1 and latents.max() <= 1
  np.testing.assert_array_equal(codec.decode(latents), frames)  # exact at the codec's own size
  big = np.zeros((8, 12, 3), np.uint8)
  big[:, :6] = 255  # left half white: after a 2x area resize the left 3 columns are white, the rest black
  small = codec.encode(big)
  np.testing.assert_allclose(small[:, :3], 1.0, atol=1e-6)
  np.testing.assert_allclose(small[:, 3:], -1.0, atol=1e-6)
  np.testing.assert_array_equal(codec.decode(np.full((4, 6, 3), 2.0)), 255)  # out of range is clipped
  # Half-size latents decoded at full size (the demo's codec): a flat latent decodes to the flat picture, and
  # encode(decode(x)) keeps a smooth latent within rounding.
  half = PixelCodec(4, 6, 8, 12)
  flat = np.full((4, 6, 3), 0.2, np.float32)
  np.testing.assert_array_equal(half.decode(flat), np.full((8, 12, 3), 153, np.uint8))  # (0.2 + 1) * 127.5 = 153
  ramp = np.broadcast_to(np.linspace(-0.5, 0.5, 6)[None, :, None], (4, 6, 3)).astype(np.float32)
  np.testing.assert_allclose(half.encode(half.decode(ramp))[:, 1:-1], ramp[:, 1:-1], atol=0.02)
  with pytest.raises(ValueError, match=r"\[\.\.\., H, W, 3\] RGB"):
    codec.encode(np.zeros((4, 6), np.uint8))
  with pytest.raises(ValueError, match="latents must be"):
    codec.decode(np.zeros((5, 6, 3)))


def test_export_round_trip_and_errors(tmp_path):
  params = {"denoiser": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, "text": {"b": np.ones(4, np.float32)}}
  path = export.export_params(params, tmp_path / "p.safetensors", config_json='{"a": 1}', step=7, source="ema")
  loaded, meta = export.load_params(path)
  np.testing.assert_array_equal(loaded["denoiser"]["w"], params["denoiser"]["w"])
  np.testing.assert_array_equal(loaded["text"]["b"], params["text"]["b"])
  assert meta["config"] == {"a": 1} and meta["step"] == "7" and meta["source"] == "ema"
  assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]  # no temporary file left
  with pytest.raises(export.ParamsFileError, match="does not exist"):
    export.load_params(tmp_path / "missing.safetensors")
  (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(export.ParamsFileError, match="not a readable safetensors file"):
    export.load_params(tmp_path / "junk.safetensors")
  from safetensors.numpy import save_file

  save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "foreign.safetensors"))
  with pytest.raises(export.ParamsFileError, match="is not a cinema_jax.params.v1 export"):
    export.load_params(tmp_path / "foreign.safetensors")


KEYFRAME_TOY = [
  "--config.model.hidden_size=32", "--config.model.num_heads=2", "--config.model.axes_dim=(4,6,6)",
  "--config.model.depth=1", "--config.model.depth_single_blocks=1", "--config.text.encoder.width=16",
  "--config.text.encoder.depth=1", "--config.text.encoder.heads=2",
]  # fmt: skip


def test_keyframe_task_trains_its_text_encoder():
  config = load_config("configs/train_keyframes.py:story", KEYFRAME_TOY)
  task = tasks.make_task(config)
  batch = task.synthetic_sample(np.random.default_rng(0), 2)
  batch = {k: np.asarray(v)[None] for k, v in batch.items()}
  params = nn.meta.unbox(task.init(jax.random.key(0), batch)["params"])
  assert set(params) == {"denoiser", "text"}
  (loss, _), grads = jax.value_and_grad(task.loss, has_aux=True)(params, batch, jax.random.key(1))
  assert np.isfinite(loss)
  text_grad = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["text"]))
  assert text_grad > 0  # captions reach the loss through the encoder


def test_caption_dropout_zeroes_the_text():
  config = load_config("configs/train_keyframes.py:story", [*KEYFRAME_TOY, "--config.train.caption_dropout=1.0"])
  task = tasks.make_task(config)
  tok = get_tokenizer("words", vocab_size=2048)
  ids, mask = tok(["Ada, the red circle, waits.", "Bo waits."], 40)
  batch = {"caption_ids": ids[None], "caption_mask": mask[None]}
  params = {"text": nn.meta.unbox(task.text.init(jax.random.key(0), ids, mask)["params"])}
  txt, y = task.encode_text(params, batch)  # no key: conditional
  assert np.abs(np.asarray(txt)).sum() > 0 and txt.shape == (1, 80, 64) and y.shape == (1, 2, 64)
  txt_drop, y_drop = task.encode_text(params, batch, jax.random.key(0))  # dropout 1.0: every caption zeroed
  np.testing.assert_array_equal(txt_drop, 0.0)
  np.testing.assert_array_equal(y_drop, 0.0)


def test_text_embedding_store_round_trip_and_errors(tmp_path):
  from cinema_jax.data.embeddings import EmbeddingsError, TextEmbeddings, write_text_embeddings

  rng = np.random.default_rng(0)
  states, pooled = rng.normal(size=(3, 4, 5)), rng.normal(size=(3, 2))
  mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], bool)
  path = write_text_embeddings(tmp_path / "t.safetensors", ["a", "b", "c"], states, mask, pooled)
  store = TextEmbeddings.load(path)
  s, m, p = store.lookup(["c", "", "a"])
  np.testing.assert_allclose(s[0], states[2] * mask[2][:, None], rtol=1e-6)  # padding rows stored as zeros
  np.testing.assert_array_equal(s[1], 0.0)  # the empty caption of a padded slot
  np.testing.assert_array_equal(m, [mask[2], [False] * 4, mask[0]])
  np.testing.assert_allclose(p[[0, 2]], pooled[[2, 0]], rtol=1e-6)
  with pytest.raises(EmbeddingsError, match="has no caption 'z' \\(and 1 more\\)"):
    store.lookup(["a", "z", "y"])
  with pytest.raises(EmbeddingsError, match="must be distinct"):
    write_text_embeddings(tmp_path / "d.safetensors", ["a", "a"], states[:2], mask[:2])
  with pytest.raises(EmbeddingsError, match="does not exist"):
    TextEmbeddings.load(tmp_path / "missing.safetensors")
  (tmp_path / "junk.safetensors").write_bytes(b"junk")
  with pytest.raises(EmbeddingsError, match="not a readable safetensors file"):
    TextEmbeddings.load(tmp_path / "junk.safetensors")


def test_caption_dropout_drops_whole_captions():
  # At rate 0.5 each keyframe slot is dropped or kept as a whole: its T token states and its pooled vector together.
  config = load_config("configs/train_keyframes.py:story", [*KEYFRAME_TOY, "--config.train.caption_dropout=0.5"])
  task = tasks.make_task(config)
  tok = get_tokenizer("words", vocab_size=2048)
  ids, mask = tok(["Ada waits."] * 8, 40)
  batch = {"caption_ids": ids.reshape(2, 4, 40), "caption_mask": mask.reshape(2, 4, 40)}
  params = {"text": nn.meta.unbox(task.text.init(jax.random.key(0), ids, mask)["params"])}
  txt, y = task.encode_text(params, batch, jax.random.key(3))
  txt = np.asarray(txt).reshape(2, 4, 40, -1)
  token_dropped = np.all(txt == 0, axis=(2, 3))  # [b, k]
  pooled_dropped = np.all(np.asarray(y) == 0, axis=-1)
  np.testing.assert_array_equal(token_dropped, pooled_dropped)
  assert 0 < token_dropped.sum() < 8  # some slots dropped, some kept

  vconfig = load_config(
    "configs/train_video.py:story",
    ["--config.model.width=32", "--config.model.heads=2", "--config.model.depth=1", "--config.model.ffn_dim=64",
     "--config.text.encoder.width=16", "--config.text.encoder.depth=1", "--config.text.encoder.heads=2",
     "--config.train.caption_dropout=0.5"],
  )  # fmt: skip
  vtask = tasks.make_task(vconfig)
  vparams = {"text": nn.meta.unbox(vtask.text.init(jax.random.key(0), ids, mask)["params"])}
  context = np.asarray(vtask.encode_text(vparams, {"caption_ids": ids, "caption_mask": mask}, jax.random.key(3)))
  dropped = np.all(context == 0, axis=(1, 2))
  assert 0 < dropped.sum() < 8
  kept = context[~dropped]
  assert np.all(np.abs(kept).sum(axis=(1, 2)) > 0)
