"""grain loaders: sample contents, determinism, resume, per-host shards, global batches on a mesh."""

import itertools
import json
import os
import socket
import subprocess
import sys

import grain
import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cinema_jax.data import ingest, loader, shards, text
from cinema_jax.parallel import make_mesh
from tests.test_data_synthetic import tiny_config, tiny_films


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  base = tmp_path_factory.getbasetemp()
  films = tiny_films(base, num_films=4, seed=10)
  out = base / "loader-shards"
  ingest.ingest(films, out, tiny_config().ingest, progress=False)
  return out


def _config(**changes) -> ml_collections.ConfigDict:
  c = tiny_config().loader
  c.unlock()
  for key, value in changes.items():
    c[key] = value
  return c


def _batches(ld, n=None):
  return list(itertools.islice(iter(ld), n))


def _equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _video(root, vid):
  return json.loads((shards.videos_dir(root) / vid / "video.json").read_text())


def test_keyframe_samples_are_padded_windows_of_a_film(dataset):
  cfg = _config(max_keyframes=3)
  ld = loader.make_loader(
    dataset, "keyframes", cfg, batch_size=1, num_epochs=6, shard_options=grain.sharding.NoSharding()
  )
  tok = text.ByteTokenizer()
  ks = set()
  for batch in _batches(ld):
    sample = {k: v[0] for k, v in batch.items()}
    k, first = int(sample["num_keyframes"]), int(sample["first_shot"])
    ks.add(k)
    video = _video(dataset, str(sample["video"]))
    assert 1 <= k <= min(3, len(video["shots"])) and first + k <= len(video["shots"])
    np.testing.assert_array_equal(sample["segment_ids"], [i if i < k else -1 for i in range(3)])
    assert list(sample["captions"][:k]) == video["captions"][first : first + k]
    assert all(c == "" for c in sample["captions"][k:])
    keyframes = shards.read_array(shards.videos_dir(dataset) / video["id"] / "keyframes.zarr")
    np.testing.assert_array_equal(sample["images"][:k], keyframes[first : first + k])
    assert not sample["images"][k:].any() and not sample["caption_mask"][k:].any()
    ids, mask = tok(video["captions"][first : first + k], cfg.caption_tokens)
    np.testing.assert_array_equal(sample["caption_tokens"][:k], ids)
    np.testing.assert_array_equal(sample["caption_mask"][:k], mask)
    assert str(sample["synopsis"]) == video["synopsis"]
    assert tok.decode(sample["synopsis_tokens"]) == video["synopsis"].encode()[: cfg.synopsis_tokens - 2].decode()
  assert len(ks) > 1  # K varies from sample to sample


def test_clip_and_control_samples_match_the_shards(dataset):
  cfg = _config(degrade_prob=0.0)
  ld = loader.make_loader(
    dataset, "control", cfg, batch_size=2, num_epochs=1, shard_options=grain.sharding.NoSharding()
  )
  tok = text.ByteTokenizer()
  for batch in _batches(ld, 3):
    for j in range(2):
      vid, i = str(batch["video"][j]), int(batch["clip"][j])
      folder = shards.videos_dir(dataset) / vid
      video = _video(dataset, vid)
      assert (
        str(batch["caption"][j])
        == video["captions"][int(batch["shot"][j])]
        == video["captions"][video["clip_shots"][i]]
      )
      np.testing.assert_array_equal(batch["frames"][j], shards.read_array(folder / "frames.zarr")[i])
      depth = shards.read_array(folder / "depth.zarr")[i].astype(np.float32)[..., None]
      np.testing.assert_array_equal(batch["depth"][j], depth)
      np.testing.assert_allclose(batch["points"][j], shards.read_array(folder / "points.zarr")[i] / 255.0, atol=1e-7)
      caption = str(batch["caption"][j]).encode()[: cfg.caption_tokens - 2].decode()
      assert tok.decode(batch["caption_tokens"][j]) == caption
  assert batch["depth"].dtype == np.float32 and batch["frames"].dtype == np.uint8


def test_control_maps_are_degraded_at_the_configured_rate(dataset):
  ld = loader.make_loader(
    dataset, "control", _config(degrade_prob=1.0), batch_size=1, num_epochs=1, shard_options=grain.sharding.NoSharding()
  )
  for batch in _batches(ld, 4):
    vid, i = str(batch["video"][0]), int(batch["clip"][0])
    stored = shards.read_array(shards.videos_dir(dataset) / vid / "depth.zarr")[i].astype(np.float32)
    assert not np.array_equal(batch["depth"][0, ..., 0], stored)
    assert batch["depth"].min() >= 0 and batch["depth"].max() <= 1


@pytest.mark.parametrize("kind", ["keyframes", "clips", "control"])
def test_same_seed_same_batches_other_seed_other_order(dataset, kind):
  cfg = _config(degrade_prob=0.5)
  make = lambda seed: loader.make_loader(  # noqa: E731
    dataset, kind, cfg, seed=seed, batch_size=2, shard_options=grain.sharding.NoSharding()
  )
  first, again, other = _batches(make(3), 6), _batches(make(3), 6), _batches(make(4), 6)
  _equal(first, again)
  digest = lambda batches: [hash(tuple(np.asarray(v).tobytes() for v in b.values())) for b in batches]  # noqa: E731
  assert digest(first) != digest(other)


@pytest.mark.parametrize("kind", ["keyframes", "control"])
def test_resume_from_saved_state_gives_the_rest_of_the_stream(dataset, kind):
  cfg = _config(degrade_prob=0.5)  # random windows / degradations must resume too
  make = lambda: loader.make_loader(dataset, kind, cfg, batch_size=2, shard_options=grain.sharding.NoSharding())  # noqa: E731
  it = iter(make())
  for _ in range(3):
    next(it)
  state = it.get_state()
  rest = [next(it) for _ in range(7)]  # crosses an epoch boundary for keyframes (4 films)
  resumed = iter(make())
  resumed.set_state(state)
  _equal([next(resumed) for _ in range(7)], rest)


@pytest.mark.parametrize("count", [2, 3])
def test_per_host_shards_are_disjoint_and_cover_the_data_set(dataset, count):
  manifest = shards.load_manifest(dataset)
  every = {(v["id"], i) for v in manifest["videos"] for i in range(v["clips"])}
  seen = []
  for index in range(count):
    options = grain.sharding.ShardOptions(shard_index=index, shard_count=count, drop_remainder=False)
    ld = loader.make_loader(
      dataset, "clips", _config(), shard_options=options, batch_size=count, num_epochs=1, drop_remainder=False
    )
    seen.append([(str(v), int(c)) for b in _batches(ld) for v, c in zip(b["video"], b["clip"], strict=True)])
  for a, b in itertools.combinations(seen, 2):
    assert not set(a) & set(b)
  assert sorted(itertools.chain(*seen)) == sorted(every)


def test_default_sharding_covers_everything_in_one_process_and_errors(dataset):
  manifest = shards.load_manifest(dataset)
  ld = loader.make_loader(dataset, "clips", _config(), batch_size=1, num_epochs=1)  # ShardByJaxProcess: 1 of 1
  assert len([b for b in ld]) == manifest["totals"]["clips"]
  with pytest.raises(ValueError, match="global batch 3 does not split over 2 processes"):
    loader.make_loader(dataset, "clips", _config(), batch_size=3, shard_options=grain.sharding.ShardOptions(0, 2))
  with pytest.raises(KeyError, match="unknown loader kind 'audio'"):
    loader.make_loader(dataset, "audio", _config())


_PROCESS = """
import json, sys
import jax

jax.distributed.initialize(f"localhost:{sys.argv[2]}", 2, int(sys.argv[1]))
import numpy as np
from cinema_jax import config as config_lib
from cinema_jax.data import loader
from cinema_jax.parallel import make_mesh

cfg = config_lib.load_config("configs/data.py:tiny").loader
mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})  # 4 devices per process
seen, rows = [], set()
for local in loader.make_loader(sys.argv[3], "clips", cfg, batch_size=4, num_epochs=1):  # default ShardByJaxProcess
  frames = loader.global_batch(local, mesh)["frames"]
  assert frames.shape[0] == 4 and local["frames"].shape[0] == 2
  parts = {s.index[0].start: np.asarray(s.data) for s in frames.addressable_shards}
  assert np.array_equal(np.concatenate([parts[r] for r in sorted(parts)]), local["frames"])
  rows |= set(parts)
  seen += [[str(v), int(c)] for v, c in zip(local["video"], local["clip"])]
json.dump({"seen": seen, "rows": sorted(rows)}, open(sys.argv[4], "w"))
"""


def test_two_processes_read_disjoint_halves_and_assemble_global_batches(dataset, tmp_path):
  """Real jax.distributed processes on the CPU: ShardByJaxProcess splits the records, global_batch places each
  process's rows on its own devices."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", _PROCESS, str(i), str(port), str(dataset), str(tmp_path / f"{i}.json")],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
    )
    for i in range(2)
  ]
  for proc in procs:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out.decode()[-3000:]
  results = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2)]
  assert results[0]["rows"] == [0, 1] and results[1]["rows"] == [2, 3]  # process order = batch order
  a, b = ({tuple(x) for x in r["seen"]} for r in results)
  manifest = shards.load_manifest(dataset)
  every = {(v["id"], i) for v in manifest["videos"] for i in range(v["clips"])}
  assert not a & b and len(a) == len(b) and a | b <= every and len(every - (a | b)) <= 2 * 2 - 1


def test_global_batch_on_the_mesh(dataset):
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  ld = loader.make_loader(dataset, "clips", _config(), batch_size=8, shard_options=grain.sharding.NoSharding())
  local = next(iter(ld))
  batch = loader.global_batch(local, mesh)
  frames = batch["frames"]
  assert isinstance(frames, jax.Array) and frames.shape == (8, 6, 48, 64, 3)
  assert frames.sharding.spec == P(("data", "fsdp"), None, None, None, None)
  np.testing.assert_array_equal(np.asarray(frames), local["frames"])
  shard_rows = {s.index[0].start for s in frames.addressable_shards}
  assert shard_rows == {0, 2, 4, 6} and all(s.data.shape[0] == 2 for s in frames.addressable_shards)
  assert isinstance(batch["caption"], np.ndarray) and batch["caption"].dtype.kind == "U"
  assert batch["caption_tokens"].sharding.spec == P(("data", "fsdp"), None)
