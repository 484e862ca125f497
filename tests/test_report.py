"""Run outputs: H.264 movies, the contact sheet, the storyboard page (seen by headless Chromium) and the run folder."""

import base64
import re
import shutil
import subprocess

import cv2
import imageio_ffmpeg
import numpy as np
import pytest

from cinema_jax.pipelines import report

# Saturated colours that the page's own style never uses (it is greys only), one per keyframe.
COLOURS = [(220, 30, 30), (30, 190, 60), (40, 70, 220), (250, 210, 20)]
BLOCK = (slice(16, 48), slice(24, 72))  # the coloured block inside each 64 x 96 keyframe: 32 x 48 pixels


def _keyframe(colour):
  image = np.full((64, 96, 3), 128, np.uint8)
  image[BLOCK] = colour
  return image


def _decode(path):
  cap = cv2.VideoCapture(str(path))
  frames = []
  while (read := cap.read())[0]:
    frames.append(cv2.cvtColor(read[1], cv2.COLOR_BGR2RGB))
  fps = cap.get(cv2.CAP_PROP_FPS)
  cap.release()
  return np.stack(frames), fps


def test_write_movie_is_browser_playable_h264(tmp_path):
  x = np.linspace(40, 160, 96)[None].repeat(64, 0)  # [64, 96]
  backdrop = np.stack([x, np.full_like(x, 90), 200 - x], -1).astype(np.uint8)
  frames = np.repeat(backdrop[None], 10, 0)
  for t in range(10):  # a block sweeping right over a graded backdrop
    frames[t, 20:44, 5 * t : 5 * t + 24] = (200, 40, 40)
  path = report.write_movie(frames, tmp_path / "clips" / "shot_001.mp4", 12)
  decoded, fps = _decode(path)
  assert decoded.shape == frames.shape and fps == pytest.approx(12)
  assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 3  # the picture survives the codec
  assert decoded[9, 32, 45:65, 0].mean() > 150 > decoded[0, 32, 45:65, 0].mean()  # and so does the motion
  probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True)
  info = probe.stderr.decode()
  assert re.search(r"Video: h264 .*yuv420p", info), info
  data = path.read_bytes()
  assert data.index(b"moov") < data.index(b"mdat"), "faststart: the index comes first so browsers start playing"
  assert sorted(p.name for p in path.parent.iterdir()) == ["shot_001.mp4"], "no temporary file left"


def test_write_movie_rejects_bad_frames(tmp_path):
  with pytest.raises(ValueError, match=r"even frame height and width, got 95x64"):
    report.write_movie(np.zeros((2, 64, 95, 3), np.uint8), tmp_path / "m.mp4", 12)
  with pytest.raises(ValueError, match=r"must be uint8 RGB \[T, H, W, 3\].*float32"):
    report.write_movie(np.zeros((2, 64, 96, 3), np.float32), tmp_path / "m.mp4", 12)
  with pytest.raises(ValueError, match="fps must be a positive number"):
    report.write_movie(np.zeros((2, 64, 96, 3), np.uint8), tmp_path / "m.mp4", 0)
  assert list(tmp_path.iterdir()) == []


def test_contact_sheet_enlarges_and_labels_every_keyframe(tmp_path):
  colours = [*COLOURS, (200, 0, 200)]
  keyframes = [np.full((64, 96, 3), c, np.uint8) for c in colours]
  sheet = report.contact_sheet(keyframes, columns=3)
  scale, gap, strip = 3, report.SHEET_GAP, report.SHEET_LABEL_HEIGHT  # 96 -> 288 >= SHEET_MIN_TILE_WIDTH
  tile_w, tile_h = 96 * scale, 64 * scale + strip
  assert sheet.shape == (gap + 2 * (tile_h + gap), gap + 3 * (tile_w + gap), 3) and sheet.dtype == np.uint8
  for i, colour in enumerate(colours):
    top, left = gap + (i // 3) * (tile_h + gap), gap + (i % 3) * (tile_w + gap)
    tile = sheet[top : top + 64 * scale, left : left + tile_w]
    assert (tile == colour).all(), f"tile {i + 1} is its keyframe, enlarged x{scale}"
    label = sheet[top + 64 * scale : top + tile_h, left : left + tile_w]
    assert (label.max(-1) > 150).sum() > 20, f"tile {i + 1} has a light label on its dark strip"
  empty = sheet[gap + tile_h + gap :, gap + 2 * (tile_w + gap) :]
  assert (empty == report.SHEET_BACKGROUND).all(), "the unused cell stays background"
  # Labels differ: "1" and a long caption-like label draw different pixels; long labels are cut to fit the tile.
  long_label = "In a sunny meadow, Ada, the red circle, walks to the right. The camera holds still."
  labelled = report.contact_sheet(keyframes[:2], ["1", long_label], scale=1)
  strip_1, strip_2 = labelled[6 + 64 :, 6 : 6 + 96], labelled[6 + 64 :, 6 + 96 + 6 : 6 + 2 * 96 + 6]
  assert (strip_2.max(-1) > 150).sum() > (strip_1.max(-1) > 150).sum()
  assert (labelled[6 + 64 :, 6 + 2 * 96 + 6 :] == report.SHEET_BACKGROUND).all(), "text stays inside its tile"
  with pytest.raises(ValueError, match="2 keyframes but 1 labels"):
    report.contact_sheet(keyframes[:2], ["a"])
  with pytest.raises(ValueError, match="share one size"):
    report.contact_sheet([keyframes[0], keyframes[1][:32]])
  with pytest.raises(ValueError, match=r"keyframe 2 must be a uint8 RGB image"):
    report.contact_sheet([keyframes[0], keyframes[1][..., 0]])


def test_write_png_round_trips(tmp_path, rng):
  image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
  path = report.write_png(tmp_path / "keyframes.png", image)
  back = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
  np.testing.assert_array_equal(back, image)
  assert [p.name for p in tmp_path.iterdir()] == ["keyframes.png"]


def _report_shots(with_keyframes, clip=lambda i: f"clips/shot {i + 1:03d}.mp4"):
  return [
    {
      "caption": f"Shot {i + 1} caption.",
      "keyframe": _keyframe(c) if with_keyframes else None,
      "clip": clip(i),
      "duration": 2.0 + 0.25 * i,
      "metrics": {"adherence": 0.5 + 0.1 * i},
    }
    for i, c in enumerate(COLOURS)
  ]


def test_report_page_escapes_embeds_and_formats(tmp_path):
  (tmp_path / "kf.png").write_bytes(report.png_bytes(_keyframe(COLOURS[3])))
  shots = [
    {"caption": 'Ada <script>alert("x")</script> & Bo', "keyframe": _keyframe(COLOURS[0]), "clip": "clips/a b.mp4"},
    {"caption": "From a file.", "keyframe": "kf.png", "duration": 2.5, "metrics": {"clip": {"drift": None}}},
  ]
  metrics = {"quality": {"psnr": 31.234567, "ssim": 0.9876543}, "drift": None, "frames": 120, "time_s": 1234.56}
  path = report.write_report(
    tmp_path / "report.html", title="Ada & <Bo>", shots=shots, metrics=metrics, notes=["seed <1>"]
  )
  page = path.read_text()
  assert "<script" not in page and "http" not in page, "no script, nothing fetched from the network"
  assert "Ada &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; Bo" in page
  assert "<h1>Ada &amp; &lt;Bo&gt;</h1>" in page and "<li>seed &lt;1&gt;</li>" in page
  assert 'src="clips/a%20b.mp4"' in page and 'src="movie.mp4"' in page
  uris = re.findall(r'<img class="keyframe" src="data:image/png;base64,([^"]+)" width="96" height="64"', page)
  assert len(uris) == 2
  for uri, colour in zip(uris, (COLOURS[0], COLOURS[3]), strict=True):
    shown = cv2.cvtColor(cv2.imdecode(np.frombuffer(base64.b64decode(uri), np.uint8), cv2.IMREAD_COLOR), 4)
    np.testing.assert_array_equal(shown, _keyframe(colour))
  cells = dict(re.findall(r'<th scope="row">([^<]*)</th><td class="num">([^<]*)</td>', page))
  assert cells == {
    "quality.psnr": "31.23",
    "quality.ssim": "0.9877",
    "drift": "\u2013",
    "frames": "120",
    "time_s": "1235",
    "clip.drift": "\u2013",
  }
  assert "2.5 s" in page and '<p class="summary">2 shots, 2.5 s</p>' in page


def test_report_rejects_bad_shots(tmp_path):
  with pytest.raises(ValueError, match=r"report shot 1 has unknown keys \['captoin'\]"):
    report.write_report(tmp_path / "r.html", title="t", shots=[{"captoin": "x"}])
  with pytest.raises(ValueError, match="report shot 1 needs a caption string"):
    report.write_report(tmp_path / "r.html", title="t", shots=[{"caption": None}])
  with pytest.raises(ValueError, match=r"report shot 2: keyframe 'k.gif' must be a \.png or \.jpg file"):
    report.write_report(tmp_path / "r.html", title="t", shots=[{"caption": "a"}, {"caption": "b", "keyframe": "k.gif"}])
  assert list(tmp_path.iterdir()) == []


def test_format_value():
  assert [report.format_value(v) for v in (None, True, np.int64(3), np.float32(0.5), 1e-5, float("nan"), [1, 2.0])] == [
    "\u2013",
    "true",
    "3",
    "0.5",
    "1e-05",
    "nan",
    "1, 2",
  ]


def test_atomic_output_dir_publishes_only_on_success(tmp_path):
  out = tmp_path / "run"
  with report.atomic_output_dir(out) as tmp:
    assert tmp.parent == tmp_path and tmp.name.startswith(".run.partial-") and not out.exists()
    (tmp / "movie.mp4").write_bytes(b"first")
  assert (out / "movie.mp4").read_bytes() == b"first"
  with pytest.raises(RuntimeError, match="generation failed"):
    with report.atomic_output_dir(out) as tmp:
      (tmp / "movie.mp4").write_bytes(b"half")
      raise RuntimeError("generation failed")
  assert (out / "movie.mp4").read_bytes() == b"first", "a failed run leaves the previous output untouched"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "and no partial folder"
  with report.atomic_output_dir(out) as tmp:
    (tmp / "report.html").write_text("second")
  assert sorted(p.name for p in out.iterdir()) == ["report.html"], "a successful run replaces the folder whole"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_atomic_output_dir_failure_without_previous_output(tmp_path):
  with pytest.raises(KeyboardInterrupt):
    with report.atomic_output_dir(tmp_path / "new" / "run") as tmp:
      (tmp / "movie.mp4").write_bytes(b"x")
      raise KeyboardInterrupt
  assert list((tmp_path / "new").iterdir()) == []
  (tmp_path / "file").write_text("x")
  with pytest.raises(FileExistsError, match="is not a folder"):
    with report.atomic_output_dir(tmp_path / "file"):
      pass


def _screenshot(chromium, page, tmp_path, name):
  png = tmp_path / f"{name}.png"
  command = [
    chromium,
    *("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"),
    *("--disable-background-networking", "--disable-component-update", "--disable-sync"),
    f"--user-data-dir={tmp_path / f'profile-{name}'}",
    *("--hide-scrollbars", "--force-device-scale-factor=1", "--window-size=1280,2400"),
    f"--screenshot={png}",
    page.resolve().as_uri(),
  ]
  result = subprocess.run(command, capture_output=True, timeout=90)
  assert result.returncode == 0 and png.exists(), result.stderr.decode(errors="replace")[-2000:]
  return cv2.cvtColor(cv2.imread(str(png), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _colour_mask(screen, colour, tolerance=8):
  return (np.abs(screen.astype(int) - np.array(colour)) <= tolerance).all(-1)


def test_report_in_headless_chromium_shows_the_keyframes(tmp_path):
  chromium = shutil.which("chromium")
  if chromium is None:
    pytest.skip("Debian chromium is not installed (apt-get install chromium); CI installs it")
  grey = np.full((6, 64, 96, 3), 128, np.uint8)
  pages = {}
  for name, with_keyframes in (("report", True), ("control", False)):
    folder = tmp_path / name
    report.write_movie(grey, folder / "movie.mp4", 12)
    for i in range(len(COLOURS)):
      report.write_movie(grey, folder / "clips" / f"shot {i + 1:03d}.mp4", 12)
    pages[name] = report.write_report(
      folder / "report.html", title="Four shots", shots=_report_shots(with_keyframes), metrics={"frames": 144}
    )
  screen = _screenshot(chromium, pages["report"], tmp_path, "report")
  control = _screenshot(chromium, pages["control"], tmp_path, "control")
  assert screen.shape == (2400, 1280, 3)
  # Each keyframe fills a card at least REPORT_CARD_MIN_WIDTH wide, less the card's padding and border (22 px).
  min_scale = (report.REPORT_CARD_MIN_WIDTH - 22) / 96
  expected = 32 * 48 * min_scale**2
  centres = []
  for colour in COLOURS:
    mask = _colour_mask(screen, colour)
    ys, xs = np.nonzero(mask)
    assert mask.sum() >= 0.9 * expected, f"keyframe colour {colour}: {mask.sum()} pixels, expected >= {expected:.0f}"
    box_h, box_w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert mask.sum() >= 0.95 * box_h * box_w, "the block is drawn as one solid rectangle (pixelated, not blurred)"
    assert box_w / box_h == pytest.approx(48 / 32, rel=0.05), "and keeps its aspect ratio"
    centres.append((ys.mean(), xs.mean()))
    assert _colour_mask(control, colour).sum() < 20, f"colour {colour} shows without keyframes: the test is unsound"
  rows, cols = zip(*centres, strict=True)
  assert max(rows) - min(rows) < 5 and list(cols) == sorted(cols), "the storyboard shows the shots left to right"
