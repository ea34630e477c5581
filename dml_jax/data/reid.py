"""Person re-identification sources: Market-1501-style images and MARS-style video tracklets.

Both duck-type the data source protocol (``len(source)``; ``source[i]`` a dict with
``"image"`` and ``"label"``; ``source.labels`` int32 ``[N]`` read without decoding; labels
``0..C-1``; ``source.classes`` the person id of each label) and add ``source.person_ids`` and
``source.camera_ids`` (int32 ``[N]``), so a query and a gallery source feed
``dml_jax.evaluation.reid_metrics(q, q.person_ids, q.camera_ids, g, g.person_ids,
g.camera_ids)`` directly. Images are decoded with PIL, as RGB; an unreadable file raises an
error naming its path.

Identity conventions (Market-1501 / MARS protocol): person id ``-1`` marks *junk* images
(``reid_metrics`` removes them from every ranking) and ``0`` *distractors* (kept as negatives).
The ``train`` split drops both (they are not people to learn; Market's and MARS's training
folders contain none); ``query`` and ``gallery`` keep every image, as the protocol evaluates
them. Layouts and the generic tracklet convention: ``docs/data.md``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from dml_jax.data.source import register

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
MARKET_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
SPLITS = ("train", "query", "gallery")
# Market-1501 "0002_c1s1_000451_03.jpg", "-1_c3s2_..."; DukeMTMC-reID "0001_c2_f0046182.jpg".
_MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")
# MARS "0001C1T0001F001.jpg"; its junk identity is written "00-1".
_MARS_NAME = re.compile(r"^(\d+|\d*-1)C(\d+)T(\d+)F(\d+)")


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """The image at ``path`` as uint8 ``[H, W, 3]`` RGB (grey, palette, RGBA converted).

    Raises:
      ValueError: naming ``path`` when PIL cannot read it.
    """
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"Cannot read image {os.fspath(path)}: {err}") from err


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}; got {split!r}.")


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"No folder {os.fspath(folder)}.")
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _contiguous(person_ids: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """``(labels int32 [N] in 0..C-1, classes)``: labels by ascending person id."""
    classes, labels = np.unique(person_ids, return_inverse=True)
    return labels.astype(np.int32), tuple(int(c) for c in classes)


# ---------------------------------------------------------------- images (Market-1501)


def parse_market_name(filename: str) -> tuple[int, int]:
    """``(person_id, camera_id)`` of a Market-1501 / DukeMTMC-reID file name.

    ``0002_c1s1_000451_03.jpg`` -> ``(2, 1)``; ``-1_c3s2_...`` -> ``(-1, 3)`` (junk);
    ``0000_...`` -> ``(0, ...)`` (distractor).

    Raises:
      ValueError: naming ``filename`` when it does not start with ``<id>_c<camera>``.
    """
    match = _MARKET_NAME.match(filename)
    if match is None:
        raise ValueError(f"Image file name {filename!r} is not '<person id>_c<camera>...' "
                         "(Market-1501 style, e.g. 0002_c1s1_000451_03.jpg).")
    return int(match.group(1)), int(match.group(2))


class ReidImages:
    """Images with person and camera ids; ``source[i]`` decodes one image.

    Holds the paths and the int32 ``[N]`` id arrays; no image until it is indexed.

    Attributes:
      paths: the ``N`` image paths, in record order.
      person_ids, camera_ids: int32 ``[N]``.
      labels: int32 ``[N]``, ``0..C-1`` by ascending person id.
      classes: the ``C`` person ids, in label order.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], person_ids: Sequence[int],
                 camera_ids: Sequence[int]):
        if not len(paths) == len(person_ids) == len(camera_ids):
            raise ValueError(f"`paths`, `person_ids` and `camera_ids` must have one entry per "
                             f"image; got {len(paths)}, {len(person_ids)}, {len(camera_ids)}.")
        self.paths = tuple(Path(p) for p in paths)
        self.person_ids = np.asarray(person_ids, np.int32).reshape(-1)
        self.camera_ids = np.asarray(camera_ids, np.int32).reshape(-1)
        self.labels, self.classes = _contiguous(self.person_ids)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """``{"image": uint8 [H, W, 3], "label", "person_id", "camera_id": int}``."""
        i = _check_index(index, len(self))
        return {"image": load_rgb(self.paths[i]), "label": int(self.labels[i]),
                "person_id": int(self.person_ids[i]), "camera_id": int(self.camera_ids[i])}


def market1501(root: str | os.PathLike, split: str) -> ReidImages:
    """A split of a Market-1501-style folder (also DukeMTMC-reID): ``train`` =
    ``root/bounding_box_train``, ``query`` = ``root/query``, ``gallery`` =
    ``root/bounding_box_test``.

    Records are the folder's image files in sorted name order (other files, such as
    ``Thumbs.db``, are ignored); ids come from the file names (:func:`parse_market_name`).
    ``train`` drops junk (``-1``) and distractor (``0``) images; ``query`` and ``gallery``
    keep them for ``reid_metrics``.

    Raises:
      ValueError: a bad ``split``, or naming an image whose name cannot be parsed.
      FileNotFoundError: naming a missing split folder.
    """
    _check_split(split)
    files = _image_files(Path(root).expanduser() / MARKET_FOLDERS[split])
    ids = [parse_market_name(p.name) for p in files]
    keep = [i for i, (pid, _) in enumerate(ids) if split != "train" or pid > 0]
    return ReidImages([files[i] for i in keep], [ids[i][0] for i in keep],
                      [ids[i][1] for i in keep])


# ---------------------------------------------------------------- video tracklets


class Tracklet(NamedTuple):
    """One person seen by one camera: the frame paths in temporal order."""

    person_id: int
    camera_id: int
    frames: tuple[Path, ...]


def sample_frames(num_available: int, num_frames: int,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """Indices (int64 ``[num_frames]``, non-decreasing) of the frames a record uses.

    The tracklet is cut into ``num_frames`` equal chunks (boundaries
    ``floor(k * num_available / num_frames)``); without ``rng`` each chunk gives its middle
    frame (evenly spaced, deterministic: for evaluation), with ``rng`` a uniformly random frame
    of the chunk (restricted random sampling, for training). Shorter tracklets repeat frames.
    """
    if num_available < 1 or num_frames < 1:
        raise ValueError(f"Need at least one frame and `num_frames` >= 1; got "
                         f"{num_available} frames, num_frames={num_frames}.")
    bounds = np.arange(num_frames + 1) * num_available // num_frames
    lo = bounds[:-1]
    width = np.maximum(bounds[1:] - lo, 1)
    offset = width // 2 if rng is None else rng.integers(0, width)
    return np.minimum(lo + offset, num_available - 1)


class ReidTracklets:
    """Video re-ID tracklets; ``source[i]`` decodes ``num_frames`` frames of tracklet ``i``.

    ``sampling="even"``: evenly spaced frames (evaluation); ``"random"``: one random frame per
    chunk drawn from ``numpy.random.default_rng([seed, i])``, so a record is a pure function of
    ``(seed, i)``. Frames whose size differs from the first sampled frame's are resized to it
    (bilinear) so they stack. Holds the frame paths and id arrays; at most one record's frames
    are decoded at a time.

    Attributes:
      tracklets: the ``N`` :class:`Tracklet`, in record order.
      person_ids, camera_ids: int32 ``[N]``.
      labels: int32 ``[N]``, ``0..C-1`` by ascending person id; ``classes``: the person ids.
    """

    def __init__(self, tracklets: Sequence[Tracklet], *, num_frames: int = 8,
                 sampling: str = "even", seed: int = 0):
        if sampling not in ("even", "random"):
            raise ValueError(f"`sampling` must be 'even' or 'random'; got {sampling!r}.")
        if num_frames < 1:
            raise ValueError(f"`num_frames` must be >= 1; got {num_frames}.")
        empty = [t for t in tracklets if not t.frames]
        if empty:
            raise ValueError(f"Tracklet of person {empty[0].person_id}, camera "
                             f"{empty[0].camera_id} has no frame.")
        self.tracklets = tuple(tracklets)
        self.num_frames, self.sampling, self.seed = num_frames, sampling, seed
        self.person_ids = np.asarray([t.person_id for t in tracklets], np.int32).reshape(-1)
        self.camera_ids = np.asarray([t.camera_id for t in tracklets], np.int32).reshape(-1)
        self.labels, self.classes = _contiguous(self.person_ids)

    def __len__(self) -> int:
        return len(self.tracklets)

    def frame_indices(self, index: int) -> np.ndarray:
        """The positions (int64 ``[num_frames]``) in tracklet ``index`` that record uses."""
        i = _check_index(index, len(self))
        rng = np.random.default_rng([self.seed, i]) if self.sampling == "random" else None
        return sample_frames(len(self.tracklets[i].frames), self.num_frames, rng)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """``{"image": uint8 [T, H, W, 3], "label", "person_id", "camera_id": int,
        "frames": int64 [T]}`` (``frames``: the positions used)."""
        i = _check_index(index, len(self))
        picks = self.frame_indices(i)
        track = self.tracklets[i]
        decoded: dict[int, np.ndarray] = {}
        for k in picks:
            if k not in decoded:
                decoded[k] = load_rgb(track.frames[k])
        h, w = decoded[picks[0]].shape[:2]
        frames = [_resize(decoded[k], w, h) for k in picks]
        return {"image": np.stack(frames), "label": int(self.labels[i]),
                "person_id": track.person_id, "camera_id": track.camera_id, "frames": picks}


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def _check_index(index: int, length: int) -> int:
    i = int(index)
    if not 0 <= i < length:
        raise IndexError(f"Index {index} out of range for a source of {length} records.")
    return i


def _make(tracklets: list[Tracklet], split: str, drop_distractors: bool,
          **kwargs: Any) -> ReidTracklets:
    lowest = 1 if drop_distractors else 0
    if split == "train":
        tracklets = [t for t in tracklets if t.person_id >= lowest]
    return ReidTracklets(tracklets, **kwargs)


def parse_mars_name(filename: str) -> tuple[int, int, int, int]:
    """``(person_id, camera_id, tracklet, frame)`` of a MARS frame name.

    ``0001C1T0001F001.jpg`` -> ``(1, 1, 1, 1)``; the junk identity ``00-1...`` -> ``-1``.

    Raises:
      ValueError: naming ``filename`` when it is not ``<pid>C<cam>T<tracklet>F<frame>``.
    """
    match = _MARS_NAME.match(filename)
    if match is None:
        raise ValueError(f"Frame file name {filename!r} is not "
                         "'<person id>C<camera>T<tracklet>F<frame>' (MARS style).")
    pid = match.group(1)
    return (-1 if "-" in pid else int(pid)), *(int(match.group(k)) for k in (2, 3, 4))


def group_mars_frames(folder: Path) -> list[Tracklet]:
    """The tracklets of a MARS folder (``folder/<pid>/<pid>C<cam>T<tracklet>F<frame>.jpg``).

    Frames are grouped by ``(pid, camera, tracklet)`` and ordered by frame number; tracklets
    are ordered by ``(pid folder name, camera, tracklet)``.

    Raises:
      FileNotFoundError: naming a missing folder. ValueError: naming a bad frame name.
    """
    groups: dict[tuple[str, int, int, int], list[tuple[int, Path]]] = {}
    if not folder.is_dir():
        raise FileNotFoundError(f"No folder {os.fspath(folder)}.")
    for person_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in _image_files(person_dir):
            pid, cam, tracklet, frame = parse_mars_name(path.name)
            groups.setdefault((person_dir.name, pid, cam, tracklet), []).append((frame, path))
    return [Tracklet(pid, cam, tuple(p for _, p in sorted(frames)))
            for (_, pid, cam, _), frames in sorted(groups.items())]


def mars(root: str | os.PathLike, split: str, *, num_frames: int = 8,
         sampling: str | None = None, seed: int = 0) -> ReidTracklets:
    """A split of MARS (``root/bbox_train``, ``root/bbox_test``, ``root/info``).

    ``train``: the tracklets of ``bbox_train`` grouped from the frame names. ``query`` /
    ``gallery``: MARS's evaluation protocol, from ``info/test_name.txt`` (frame names),
    ``info/tracks_test_info.mat`` (``track_test_info``: rows ``[first, last, pid, camera]``,
    1-based inclusive positions in ``test_name.txt``) and ``info/query_IDX.mat`` (``query_IDX``:
    1-based rows that are queries); the gallery is every other test tracklet (the query's own
    tracklet would be junk anyway: same person, same camera). ``sampling`` defaults to
    ``"random"`` for ``train`` and ``"even"`` otherwise.

    Raises:
      FileNotFoundError: naming a missing folder or ``info`` file.
    """
    _check_split(split)
    root = Path(root).expanduser()
    sampling = sampling or ("random" if split == "train" else "even")
    kwargs = {"num_frames": num_frames, "sampling": sampling, "seed": seed}
    if split == "train":
        return _make(group_mars_frames(root / "bbox_train"), split, True, **kwargs)
    tracks = _mars_test_tracklets(root)
    query_rows = _mars_query_rows(root, len(tracks))
    if split == "query":
        chosen = [tracks[r] for r in query_rows]
    else:
        is_query = set(query_rows)
        chosen = [t for r, t in enumerate(tracks) if r not in is_query]
    return _make(chosen, split, True, **kwargs)


def _loadmat(path: Path) -> dict:
    from scipy import io as sio

    if not path.is_file():
        raise FileNotFoundError(f"No file {os.fspath(path)} (MARS's evaluation 'info' files: "
                                "see docs/data.md).")
    try:
        return sio.loadmat(os.fspath(path))
    except (ValueError, TypeError, OSError) as err:
        raise ValueError(f"Cannot read MATLAB file {os.fspath(path)}: {err}") from err


def _mars_test_tracklets(root: Path) -> list[Tracklet]:
    names_path = root / "info" / "test_name.txt"
    if not names_path.is_file():
        raise FileNotFoundError(f"No file {os.fspath(names_path)} (MARS's evaluation 'info' "
                                "files: see docs/data.md).")
    names = [n.strip() for n in names_path.read_text().splitlines() if n.strip()]
    rows = np.asarray(_loadmat(root / "info" / "tracks_test_info.mat")["track_test_info"])
    out = []
    for first, last, pid, cam in rows.astype(np.int64):
        if not 1 <= first <= last <= len(names):
            raise ValueError(f"tracks_test_info.mat row [{first}, {last}, {pid}, {cam}] is "
                             f"outside test_name.txt's {len(names)} names.")
        frames = tuple(root / "bbox_test" / n[:4] / n for n in names[first - 1: last])
        out.append(Tracklet(int(pid), int(cam), frames))
    return out


def _mars_query_rows(root: Path, num_tracks: int) -> list[int]:
    rows = [int(r) - 1 for r in np.asarray(
        _loadmat(root / "info" / "query_IDX.mat")["query_IDX"]).ravel()]
    if any(not 0 <= r < num_tracks for r in rows):
        raise ValueError(f"query_IDX.mat has a row outside 1..{num_tracks}.")
    return rows


def tracklet_folders(root: str | os.PathLike, split: str, *, num_frames: int = 8,
                     sampling: str | None = None, seed: int = 0) -> ReidTracklets:
    """A split of the generic tracklet layout
    ``root/<split>/<person id>/<camera id>/<tracklet name>/<frame images>``.

    ``split`` is ``train``, ``query`` or ``gallery``; person and camera folder names are
    integers (``-1``: junk, ``0``: distractor, as in Market/MARS); each tracklet folder's image
    files, in sorted name order, are its frames. Tracklets are ordered by (person, camera,
    tracklet name). ``train`` drops junk (negative) ids only. ``sampling`` defaults to
    ``"random"`` for ``train`` and ``"even"`` otherwise.

    Raises:
      FileNotFoundError: naming a missing split folder. ValueError: naming a non-integer
        person/camera folder or an empty tracklet folder.
    """
    _check_split(split)
    base = Path(root).expanduser() / split
    if not base.is_dir():
        raise FileNotFoundError(f"No folder {os.fspath(base)}.")
    tracklets = []
    for person_dir in _int_dirs(base):
        for camera_dir in _int_dirs(person_dir):
            for track_dir in sorted(p for p in camera_dir.iterdir() if p.is_dir()):
                frames = _image_files(track_dir)
                if not frames:
                    raise ValueError(f"Tracklet folder {os.fspath(track_dir)} has no image.")
                tracklets.append(Tracklet(int(person_dir.name), int(camera_dir.name),
                                          tuple(frames)))
    sampling = sampling or ("random" if split == "train" else "even")
    return _make(tracklets, split, False, num_frames=num_frames, sampling=sampling, seed=seed)


def _int_dirs(folder: Path) -> list[Path]:
    """Sub-folders of ``folder`` sorted by their integer name."""
    dirs = [p for p in folder.iterdir() if p.is_dir()]
    for p in dirs:
        try:
            int(p.name)
        except ValueError:
            raise ValueError(f"Folder {os.fspath(p)} is not named by an integer id.") from None
    return sorted(dirs, key=lambda p: int(p.name))


# ---------------------------------------------------------------- registry


@register("market1501")
def _market1501_source(split: str, *, root: str) -> ReidImages:
    """``config.dataset = {"name": "market1501", "root": ...}`` (see :func:`market1501`)."""
    return market1501(root, split)


@register("mars")
def _mars_source(split: str, *, root: str, num_frames: int = 8, seed: int = 0) -> ReidTracklets:
    """``config.dataset = {"name": "mars", "root": ..., "num_frames": 8}`` (see :func:`mars`)."""
    return mars(root, split, num_frames=num_frames, seed=seed)


@register("tracklet_folders")
def _tracklet_folders_source(split: str, *, root: str, num_frames: int = 8,
                             seed: int = 0) -> ReidTracklets:
    """``config.dataset = {"name": "tracklet_folders", "root": ...}`` (see
    :func:`tracklet_folders`)."""
    return tracklet_folders(root, split, num_frames=num_frames, seed=seed)
