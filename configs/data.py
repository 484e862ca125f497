"""The film data pipeline: synthetic films, ingest (shots, captions, clips, control maps), loaders.

Commands:
  cinema-jax synth --out data/films [--config configs/data.py:VARIANT] [--config.synth.num_films=16]
  cinema-jax ingest data/films --out data/shards [--config configs/data.py:VARIANT]

Variants (``configs/data.py:VARIANT``):

  default  the demo's embedded data set: 8 synthetic 96 x 64 films at 12 fps (3-5 shots of 1.5-2.5 s), clips of
           8 frames at 64 x 96; on 2 CPU cores synth takes ~3 s and ingest ~5 s (38 shots, 99 clips, 10 MB).
  tiny     the tests: 64 x 48 films of 2-3 shots, clips of 6 frames at 48 x 64.
  story    the story demo's training set: 480 default-size films, keyframes at each shot's first frame (a shot's
           clip starts from its keyframe), clips every 4 frames, no control maps; captions as hashed words.
  film     real films (LongVie v1 data): clips of 49 frames at 8 fps and 480 x 720, 70 x 70 point grid; keyframes
           at 400 x 720 (Captain Cinema's 400-pixel short side).

Shot detection defaults are PySceneDetect's ContentDetector defaults (threshold 27, min_scene_len 15), as used by
Captain Cinema. Depth normalisation and point maps follow LongVie (see docs/data.md).
"""

import ml_collections
from ml_collections import config_dict

from cinema_jax.config import import_config

VARIANTS = ("default", "tiny", "story", "film")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/data.py; choose one of {', '.join(VARIANTS)}")
  c = import_config("base").get_config("default")
  c.variant = variant

  # Synthetic films (cinema_jax/data/synthetic.py). Film i has seed `seed + i`; same seed -> same bytes.
  c.synth = ml_collections.ConfigDict()
  c.synth.num_films = 8
  c.synth.seed = 0
  c.synth.width = 96  # even (H.264 yuv420p)
  c.synth.height = 64
  c.synth.fps = 12.0
  c.synth.shots = (3, 5)  # shots per film, inclusive range
  c.synth.shot_frames = (18, 30)  # frames per shot, inclusive; >= min_scene_len so every cut is detectable
  c.synth.max_actors = 2  # characters per shot (1..max_actors)
  c.synth.pan_speed = (0.3, 0.8)  # camera pan/tilt speed range, output pixels per frame
  c.synth.walk_speed = (0.3, 0.9)  # character walking speed range, world pixels per frame
  c.synth.zoom_change = 0.2  # zoom in/out: the zoom factor changes by this much over a shot
  c.synth.supersample = 4  # render at 4x and area-average (anti-aliasing for sub-pixel motion)
  c.synth.crf = 16  # x264 quality (lower = better); 16 keeps KLT within a fraction of a pixel
  c.synth.track_grid = (8, 6)  # ground-truth tracks per shot: cols x rows grid at the shot's first frame

  # Ingest (cinema_jax/data/ingest.py).
  c.ingest = ml_collections.ConfigDict()
  c.ingest.extensions = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")  # video files; others are unsupported
  c.ingest.min_decoded_fraction = 0.9  # fewer decoded frames than this x the header's count = truncated (0 = off)
  c.ingest.detector = "content"  # PySceneDetect detector: content | adaptive | threshold | histogram | hash
  c.ingest.threshold = 27.0  # detector threshold (ContentDetector default 27; adaptive: adaptive_threshold)
  c.ingest.min_scene_len = 15  # frames; shorter shots merge into their neighbour (PySceneDetect default)
  c.ingest.detect_downscale = config_dict.placeholder(int)  # shrink factor for shot detection (None = auto, ~256 px)
  c.ingest.captioner = "sidecar"  # captions.CAPTIONERS: sidecar = STEM.json / .srt / .txt beside the video
  c.ingest.depth = "auto"  # control.DEPTH_ESTIMATORS: auto | synthetic | precomputed | none
  c.ingest.depth_metric = False  # precomputed depth is metric (larger = farther) and must be inverted
  c.ingest.keyframe = "middle"  # keyframe of a shot: middle | first | sharpest
  c.ingest.keyframe_size = (64, 96)  # (h, w) of stored keyframes
  c.ingest.fps = 12.0  # clip frame rate; <= 0 keeps the source rate
  c.ingest.clip_size = (64, 96)  # (h, w) of clip frames and control maps
  c.ingest.clip_frames = 8  # frames per clip (T)
  c.ingest.clip_stride = 8  # frames between clip starts (= clip_frames: no overlap)
  c.ingest.track_method = "grid"  # KLT query points: grid | features (Shi-Tomasi corners)
  c.ingest.track_grid = (16, 12)  # cols x rows of the query grid (LongVie: 70 x 70)
  c.ingest.track_max_points = 200  # at most this many corners with track_method = features
  c.ingest.track_fb_threshold = 1.0  # pixels; a larger forward-backward error loses the point
  c.ingest.track_window = 11  # Lucas-Kanade window side, pixels
  c.ingest.track_levels = 2  # Lucas-Kanade pyramid levels above the full resolution
  c.ingest.point_size = 0.5  # point-map square side / smallest inter-point distance at the first frame

  # Loaders (cinema_jax/data/loader.py).
  c.loader = ml_collections.ConfigDict()
  c.loader.batch_size = 8  # global batch; each process loads batch_size / process_count
  c.loader.seed = 0  # shuffle order and per-sample randomness (keyframe windows, degradations)
  c.loader.shuffle = True
  c.loader.num_epochs = -1  # passes over the data; -1 = endless
  c.loader.worker_count = 0  # grain worker processes (0 = in the main process)
  c.loader.max_keyframes = 4  # K slots of a keyframe sample; a sample takes 1..K consecutive shots of a film
  c.loader.min_keyframes = 1
  c.loader.tokenizer = "bytes"  # text.TOKENIZERS: bytes (259 ids) | words (hashed, vocab_size ids)
  c.loader.vocab_size = 4096  # words tokenizer only
  c.loader.caption_tokens = 64  # tokens per caption, BOS and EOS included
  c.loader.synopsis_tokens = 256  # tokens of a film synopsis
  c.loader.degrade_prob = 0.10  # LongVie data-level degradation of control maps (scale fusion and/or blur)
  c.loader.degrade_scales = (1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125)  # random scale fusion scales
  c.loader.degrade_kernels = (3, 5, 7, 9, 11, 13, 15)  # average blur kernel sides at reference_side
  c.loader.degrade_reference_side = 480  # short side at which the blur kernels apply as listed

  if variant == "tiny":
    c.synth.num_films = 3
    c.synth.width, c.synth.height = 64, 48
    c.synth.shots = (2, 3)
    c.synth.shot_frames = (16, 24)
    c.ingest.keyframe_size = (48, 64)
    c.ingest.clip_size = (48, 64)
    c.ingest.clip_frames = 6
    c.ingest.clip_stride = 6
    c.ingest.track_grid = (12, 9)
    c.loader.batch_size = 4
    c.loader.max_keyframes = 3
    c.loader.caption_tokens = 32
    c.loader.synopsis_tokens = 64
  elif variant == "story":
    c.synth.num_films = 480
    c.ingest.keyframe = "first"
    c.ingest.clip_stride = 4  # overlapping clips: twice the training windows from the same films
    c.ingest.depth = "none"
    c.loader.tokenizer = "words"
    c.loader.vocab_size = 2048
    c.loader.caption_tokens = 40
    c.loader.max_keyframes = 3
  elif variant == "film":
    c.synth.width, c.synth.height = 720, 480
    c.ingest.keyframe_size = (400, 720)
    c.ingest.fps = 8.0
    c.ingest.clip_size = (480, 720)
    c.ingest.clip_frames = 49
    c.ingest.clip_stride = 49
    c.ingest.track_grid = (70, 70)
    c.ingest.track_window = 21
    c.ingest.track_levels = 3
    c.loader.max_keyframes = 8
    c.loader.caption_tokens = 128
    c.loader.synopsis_tokens = 512
  return c
