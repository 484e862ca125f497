"""On-disk layout of an ingested data set: ArrayRecord records, tensorstore zarr arrays, manifests.

```
DIR/manifest.json                   the data set: settings, one entry per video (sorted by id), totals
DIR/videos/VIDEO_ID/                one finished video (a shard group); VIDEO_ID = file stem + content hash
  video.json                        its manifest: source (relative), decode info, shots, captions, clips, files
  films.array_record                one record: the film (shots, captions, synopsis) for keyframe samples
  clips.array_record                one record per clip (shot, caption, source frames)
  keyframes.zarr                    uint8 [S, h, w, 3]        one keyframe per shot
  frames.zarr                       uint8 [N, T, h, w, 3]     clips at the target fps and size
  depth.zarr                        float16 [N, T, h, w]      globally normalised inverse depth, near = 0 (control)
  points.zarr                       uint8 [N, T, h, w, 3]     LongVie point maps (control)
  tracks.zarr                       float32 [N, P, T, 2]      KLT tracks, NaN once lost (control)
```

Records are UTF-8 JSON (sorted keys) and name their video and index; dense arrays live in zarr (one chunk per
clip or keyframe, zstd) and are read by index. Every video is written into ``videos/.tmp-VIDEO_ID`` and renamed to
``videos/VIDEO_ID`` when complete (a directory rename is atomic on POSIX file systems), so an interrupted ingest
leaves at most a temporary folder, which the next run deletes; a finished folder is never rewritten. The data set
manifest is rebuilt from the finished folders after every video (temporary file + rename). No file holds times,
process ids, output paths or absolute input paths (a video's ``source`` is its path relative to the ingest argument
it came from: the file name for a file, the path inside the folder for a folder), so the same inputs and settings
give the same bytes whatever the history of runs and wherever the inputs lie. One ingest at a time may write to a
DIR.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import tensorstore as ts
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

FORMAT = "cinema_jax.films.v1"
MANIFEST = "manifest.json"
VIDEO_MANIFEST = "video.json"
VIDEOS = "videos"
TMP_PREFIX = ".tmp-"
# group_size:1 makes every record its own chunk: random access reads one record, which grain's sampler needs.
RECORD_OPTIONS = "group_size:1"


def encode_record(obj) -> bytes:
  return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def decode_record(data: bytes):
  return json.loads(data.decode("utf-8"))


def write_records(path: pathlib.Path, records: Iterable) -> int:
  """Writes JSON-serialisable records to an ArrayRecord file; returns how many."""
  writer = ArrayRecordWriter(str(path), RECORD_OPTIONS)
  count = 0
  try:
    for record in records:
      writer.write(encode_record(record))
      count += 1
  finally:
    writer.close()
  return count


def read_records(path: pathlib.Path) -> list:
  reader = ArrayRecordReader(str(path))
  try:
    n = reader.num_records()
    return [decode_record(r) for r in reader.read(list(range(n)))] if n else []
  finally:
    reader.close()


def write_array(path: pathlib.Path, array: np.ndarray) -> None:
  """A zarr (v2) array through tensorstore, one chunk per leading index, zstd-compressed."""
  array = np.ascontiguousarray(array)
  chunks = [1, *array.shape[1:]] if array.ndim else []
  spec = {
    "driver": "zarr",
    "kvstore": {"driver": "file", "path": str(path)},
    "metadata": {"compressor": {"id": "zstd", "level": 3}, "chunks": [max(c, 1) for c in chunks]},
  }
  store = ts.open(spec, create=True, delete_existing=True, dtype=ts.dtype(array.dtype.name), shape=array.shape)
  store.result().write(array).result()


def open_array(path: pathlib.Path) -> ts.TensorStore:
  """A read-only handle; index it and ``.read().result()`` for numpy."""
  spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}}
  return ts.open(spec, read=True, open=True).result()


def read_array(path: pathlib.Path) -> np.ndarray:
  return open_array(path).read().result()


def write_json(path: pathlib.Path, obj) -> None:
  """JSON through a temporary file and a rename, so readers never see half a file."""
  tmp = path.with_name(f".{path.name}.partial")
  tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
  os.replace(tmp, path)


def videos_dir(root: pathlib.Path) -> pathlib.Path:
  return pathlib.Path(root) / VIDEOS


def is_finished(root: pathlib.Path, video_id: str) -> bool:
  return (videos_dir(root) / video_id / VIDEO_MANIFEST).exists()


def clean_partial(root: pathlib.Path) -> list[pathlib.Path]:
  """Deletes temporary folders and files an interrupted run left; returns them."""
  removed = []
  for folder in (pathlib.Path(root), videos_dir(root)):
    if not folder.is_dir():
      continue
    for path in sorted(folder.iterdir()):
      if path.name.startswith(TMP_PREFIX) or path.name.endswith(".partial"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        removed.append(path)
  return removed


@contextlib.contextmanager
def atomic_video_dir(root: pathlib.Path, video_id: str) -> Iterator[pathlib.Path]:
  """Yields ``videos/.tmp-ID`` to fill; renames it to ``videos/ID`` on success, deletes it on an exception."""
  final = videos_dir(root) / video_id
  if final.exists():
    raise FileExistsError(f"shard folder {final} already exists; finished videos are never rewritten")
  tmp = videos_dir(root) / f"{TMP_PREFIX}{video_id}"
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir(parents=True)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  _fsync_tree(tmp)
  os.rename(tmp, final)


def _fsync_tree(folder: pathlib.Path) -> None:
  """Flushes file contents before the rename publishes them (a crash after the rename must not lose data)."""
  for path in folder.rglob("*"):
    if path.is_file():
      with open(path, "rb") as f:
        os.fsync(f.fileno())


def finished_videos(root: pathlib.Path) -> list[dict]:
  """The per-video manifests of every finished video, sorted by id."""
  folder = videos_dir(root)
  if not folder.is_dir():
    return []
  out = []
  for path in sorted(folder.iterdir()):
    if path.is_dir() and not path.name.startswith(TMP_PREFIX) and (path / VIDEO_MANIFEST).exists():
      out.append(json.loads((path / VIDEO_MANIFEST).read_text(encoding="utf-8")))
  return out


def write_manifest(root: pathlib.Path, settings: dict) -> dict:
  """Rebuilds DIR/manifest.json from the finished videos."""
  entries = []
  for video in finished_videos(root):
    entries.append(
      {
        "id": video["id"],
        "source": video["source"],
        "frames": video["info"]["frames"],
        "fps": video["info"]["fps"],
        "size": [video["info"]["height"], video["info"]["width"]],
        "shots": len(video["shots"]),
        "clips": video["num_clips"],
        "has_control": video["has_control"],
      }
    )
  manifest = {
    "format": FORMAT,
    "settings": settings,
    "videos": entries,
    "totals": {
      "videos": len(entries),
      "shots": sum(e["shots"] for e in entries),
      "clips": sum(e["clips"] for e in entries),
      "control_clips": sum(e["clips"] for e in entries if e["has_control"]),
    },
  }
  write_json(pathlib.Path(root) / MANIFEST, manifest)
  return manifest


def load_manifest(root: pathlib.Path) -> dict:
  path = pathlib.Path(root) / MANIFEST
  if not path.exists():
    raise FileNotFoundError(f"{root} is not an ingested data set: {MANIFEST} is missing (run cinema-jax ingest)")
  manifest = json.loads(path.read_text(encoding="utf-8"))
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
  return manifest


def record_files(root: pathlib.Path, kind: str, manifest: dict | None = None) -> list[pathlib.Path]:
  """ArrayRecord files for a loader, in manifest order: ``films``, ``clips`` or ``control`` (clips of videos that
  have control maps)."""
  manifest = load_manifest(root) if manifest is None else manifest
  name = {"films": "films", "clips": "clips", "control": "clips"}[kind]
  videos = [v for v in manifest["videos"] if kind != "control" or v["has_control"]]
  if kind != "films":
    videos = [v for v in videos if v["clips"] > 0]
  return [videos_dir(root) / v["id"] / f"{name}.array_record" for v in videos]


def tree_digest(root: pathlib.Path, skip: Sequence[str] = ()) -> dict[str, str]:
  """sha256 of every file under ``root`` by relative path (to compare two data sets byte for byte)."""
  import hashlib

  out = {}
  for path in sorted(pathlib.Path(root).rglob("*")):
    rel = path.relative_to(root).as_posix()
    if path.is_file() and not any(part in rel for part in skip):
      out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
  return out
