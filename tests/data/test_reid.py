"""Re-ID sources: Market-1501 and MARS style folders, frame sampling, reid_metrics inputs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dml_jax.data import reid
from dml_jax.evaluation import reid_metrics

# A person's colour: images of one identity look alike, others far apart.
COLOURS = {-1: (200, 30, 30), 0: (10, 10, 240), 2: (200, 30, 30), 7: (30, 200, 30),
           9: (240, 240, 10), 1: (200, 30, 30), 3: (30, 200, 30)}


def write_image(path, colour, size=(6, 8), shade=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    pixels = np.empty((h, w, 3), np.uint8)
    pixels[:] = colour
    pixels[0, 0] = (shade, shade, shade)  # marks the frame number
    Image.fromarray(pixels).save(path)


def mean_colour(records):
    """Embedding of a record: its mean pixel colour (float32 [N, 3])."""
    return np.stack([r["image"].reshape(-1, 3).mean(axis=0) for r in records]).astype(np.float32)


# ---------------------------------------------------------------- Market-1501

MARKET = {
    "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg",
                           "0007_c3s3_064744_04.jpg", "0000_c1s1_000001_01.jpg",
                           "-1_c1s1_000002_01.jpg"],
    "query": ["0002_c1s1_000451_01.jpg", "0007_c3s3_064744_01.jpg"],
    # "-1" comes first and has query 0002's colour: ranked first unless treated as junk.
    "bounding_box_test": ["-1_c1s1_000401_03.jpg", "0000_c3s1_000101_01.jpg",
                          "0002_c1s1_000501_02.jpg", "0002_c5s1_000601_01.jpg",
                          "0007_c1s2_000701_01.jpg", "0009_c3s3_000801_01.jpg"],
}


@pytest.fixture
def market_root(tmp_path):
    for folder, names in MARKET.items():
        for name in names:
            write_image(tmp_path / folder / name, COLOURS[reid.parse_market_name(name)[0]])
        (tmp_path / folder / "Thumbs.db").write_bytes(b"\0\1")  # ignored
    return tmp_path


def test_parse_market_name():
    assert reid.parse_market_name("0002_c1s1_000451_03.jpg") == (2, 1)
    assert reid.parse_market_name("-1_c3s2_000451_03.jpg") == (-1, 3)
    assert reid.parse_market_name("0000_c6s1_000001_01.jpg") == (0, 6)
    assert reid.parse_market_name("0001_c2_f0046182.jpg") == (1, 2)  # DukeMTMC-reID
    with pytest.raises(ValueError, match=r"img_12\.jpg"):
        reid.parse_market_name("img_12.jpg")


def test_market_splits(market_root):
    train = reid.market1501(market_root, "train")
    assert len(train) == 3  # junk and distractor dropped
    np.testing.assert_array_equal(train.person_ids, [2, 2, 7])
    np.testing.assert_array_equal(train.camera_ids, [1, 2, 3])
    np.testing.assert_array_equal(train.labels, [0, 0, 1])
    assert train.labels.dtype == np.int32 and train.classes == (2, 7)
    gallery = reid.market1501(market_root, "gallery")
    assert len(gallery) == 6
    np.testing.assert_array_equal(gallery.person_ids, [-1, 0, 2, 2, 7, 9])
    np.testing.assert_array_equal(gallery.camera_ids, [1, 3, 1, 5, 1, 3])
    assert gallery.classes == (-1, 0, 2, 7, 9)
    np.testing.assert_array_equal(gallery.labels, [0, 1, 2, 2, 3, 4])
    r = gallery[3]
    assert r["image"].dtype == np.uint8 and r["image"].shape == (8, 6, 3)
    np.testing.assert_array_equal(r["image"], reid.load_rgb(gallery.paths[3]))
    assert (r["label"], r["person_id"], r["camera_id"]) == (2, 2, 5)
    with pytest.raises(IndexError):
        gallery[6]
    with pytest.raises(ValueError, match="split"):
        reid.market1501(market_root, "test")


def test_market_feeds_reid_metrics(market_root):
    query = reid.market1501(market_root, "query")
    gallery = reid.market1501(market_root, "gallery")
    q = mean_colour(query[i] for i in range(len(query)))
    g = mean_colour(gallery[i] for i in range(len(gallery)))
    m = reid_metrics(q, query.person_ids, query.camera_ids, g, gallery.person_ids,
                     gallery.camera_ids, ranks=(1,))
    # Query 0002/c1: the -1 image and 0002/c1 are junk, 0002/c5 is first; 0007/c3: 0007/c1.
    assert m["num_queries"] == 2
    assert m["cmc@1"] == 1.0 and m["map"] == 1.0


def test_market_errors_name_the_file(market_root):
    write_image(market_root / "query" / "person.jpg", (0, 0, 0))
    with pytest.raises(ValueError, match=r"person\.jpg"):
        reid.market1501(market_root, "query")
    (market_root / "query" / "person.jpg").unlink()
    bad = market_root / "query" / "0003_c1s1_000001_01.jpg"
    bad.write_bytes(b"not a jpeg")
    query = reid.market1501(market_root, "query")
    with pytest.raises(ValueError, match=r"0003_c1s1_000001_01\.jpg"):
        query[list(query.paths).index(bad)]
    with pytest.raises(FileNotFoundError, match="bounding_box_train"):
        reid.market1501(market_root / "nowhere", "train")


# ---------------------------------------------------------------- frame sampling


def test_sample_frames_even():
    np.testing.assert_array_equal(reid.sample_frames(5, 4), [0, 1, 2, 4])
    np.testing.assert_array_equal(reid.sample_frames(10, 3), [1, 4, 8])
    np.testing.assert_array_equal(reid.sample_frames(2, 4), [0, 0, 1, 1])
    np.testing.assert_array_equal(reid.sample_frames(1, 3), [0, 0, 0])
    with pytest.raises(ValueError):
        reid.sample_frames(0, 3)


def test_sample_frames_random_stays_in_chunks():
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(200):
        idx = reid.sample_frames(10, 3, rng)
        assert 0 <= idx[0] < 3 and 3 <= idx[1] < 6 and 6 <= idx[2] < 10
        seen.add(tuple(idx))
    assert len(seen) > 20  # not a fixed pick


# ---------------------------------------------------------------- MARS


def mars_frame(root, folder, pid, cam, track, frame, size=(6, 8)):
    pid_str = "00-1" if pid == -1 else f"{pid:04d}"
    name = f"{pid_str}C{cam}T{track:04d}F{frame:03d}.jpg"
    write_image(root / folder / pid_str / name, COLOURS[pid], size, shade=frame * 20)
    return name


@pytest.fixture
def mars_root(tmp_path):
    from scipy import io as sio

    for frame in (3, 1, 2, 5, 4):  # written out of order
        mars_frame(tmp_path, "bbox_train", 1, 1, 1, frame)
    for frame in (1, 2, 3):
        mars_frame(tmp_path, "bbox_train", 1, 2, 2, frame, size=(4, 8) if frame == 2 else (6, 8))
    mars_frame(tmp_path, "bbox_train", 3, 1, 1, 1)
    # test tracks (pid, cam, frames): queries are rows 1 and 3 (1-based).
    tracks = [(2, 1, 3), (2, 1, 2), (7, 2, 4), (2, 3, 2), (-1, 3, 2), (0, 4, 3), (7, 5, 1)]
    names, info = [], []
    for t, (pid, cam, n) in enumerate(tracks, 1):
        first = len(names) + 1
        names += [mars_frame(tmp_path, "bbox_test", pid, cam, t, f) for f in range(1, n + 1)]
        info.append([first, len(names), pid, cam])
    (tmp_path / "info").mkdir()
    (tmp_path / "info" / "test_name.txt").write_text("\n".join(names) + "\n")
    sio.savemat(tmp_path / "info" / "tracks_test_info.mat",
                {"track_test_info": np.array(info, np.float64)})
    sio.savemat(tmp_path / "info" / "query_IDX.mat", {"query_IDX": np.array([[1, 3]], np.float64)})
    return tmp_path


def test_parse_mars_name():
    assert reid.parse_mars_name("0001C1T0001F001.jpg") == (1, 1, 1, 1)
    assert reid.parse_mars_name("00-1C3T0012F104.jpg") == (-1, 3, 12, 104)
    with pytest.raises(ValueError, match=r"0001_c1\.jpg"):
        reid.parse_mars_name("0001_c1.jpg")


def test_mars_train_tracklets_and_frames(mars_root):
    train = reid.mars(mars_root, "train", num_frames=4)
    assert train.sampling == "random"
    assert len(train) == 3
    np.testing.assert_array_equal(train.person_ids, [1, 1, 3])
    np.testing.assert_array_equal(train.camera_ids, [1, 2, 1])
    np.testing.assert_array_equal(train.labels, [0, 0, 1])
    first = train.tracklets[0]
    assert [reid.parse_mars_name(p.name)[3] for p in first.frames] == [1, 2, 3, 4, 5]
    r = train[0]
    assert r["image"].shape == (4, 8, 6, 3) and r["image"].dtype == np.uint8
    for k, pos in enumerate(r["frames"]):
        np.testing.assert_array_equal(r["image"][k], reid.load_rgb(first.frames[pos]))
    # Random sampling is a pure function of (seed, index).
    again = reid.mars(mars_root, "train", num_frames=4)
    for i in range(3):
        np.testing.assert_array_equal(train.frame_indices(i), again.frame_indices(i))
        np.testing.assert_array_equal(train[i]["image"], again[i]["image"])
    other = [reid.mars(mars_root, "train", num_frames=4, seed=s).frame_indices(0)
             for s in range(1, 30)]
    assert len({tuple(x) for x in other}) > 1
    # Even sampling: chunk middles; a narrower frame is resized to the first frame's size.
    even = reid.mars(mars_root, "train", num_frames=4, sampling="even")
    np.testing.assert_array_equal(even.frame_indices(0), [0, 1, 2, 4])
    r = even[1]
    np.testing.assert_array_equal(r["frames"], [0, 0, 1, 2])
    assert r["image"].shape == (4, 8, 6, 3)


def test_mars_query_gallery_feed_reid_metrics(mars_root):
    query = reid.mars(mars_root, "query", num_frames=2)
    gallery = reid.mars(mars_root, "gallery", num_frames=2)
    assert query.sampling == gallery.sampling == "even"
    np.testing.assert_array_equal(query.person_ids, [2, 7])
    np.testing.assert_array_equal(query.camera_ids, [1, 2])
    np.testing.assert_array_equal(gallery.person_ids, [2, 2, -1, 0, 7])
    np.testing.assert_array_equal(gallery.camera_ids, [1, 3, 3, 4, 5])
    assert [len(t.frames) for t in gallery.tracklets] == [2, 2, 2, 3, 1]
    q = mean_colour(query[i] for i in range(len(query)))
    g = mean_colour(gallery[i] for i in range(len(gallery)))
    m = reid_metrics(q, query.person_ids, query.camera_ids, g, gallery.person_ids,
                     gallery.camera_ids, ranks=(1,))
    assert m["num_queries"] == 2 and m["cmc@1"] == 1.0 and m["map"] == 1.0
    (mars_root / "info" / "query_IDX.mat").unlink()
    with pytest.raises(FileNotFoundError, match=r"query_IDX\.mat"):
        reid.mars(mars_root, "query")


# ---------------------------------------------------------------- generic tracklet folders


def test_tracklet_folders(tmp_path):
    for split, pid, cam, track, n in [("train", 1, 1, "a", 3), ("train", -1, 2, "a", 1),
                                      ("train", 3, 2, "b", 2), ("query", 1, 1, "x", 2),
                                      ("gallery", 1, 2, "y", 4), ("gallery", 3, 1, "z", 2)]:
        for f in range(n):
            write_image(tmp_path / split / str(pid) / str(cam) / track / f"{f:03d}.png",
                        COLOURS[pid], shade=10 * f)
    train = reid.tracklet_folders(tmp_path, "train", num_frames=2)
    np.testing.assert_array_equal(train.person_ids, [1, 3])  # junk -1 dropped
    assert train.sampling == "random" and train.classes == (1, 3)
    gallery = reid.tracklet_folders(tmp_path, "gallery", num_frames=3)
    np.testing.assert_array_equal(gallery.person_ids, [1, 3])
    np.testing.assert_array_equal(gallery.camera_ids, [2, 1])
    np.testing.assert_array_equal(gallery.frame_indices(0), [0, 1, 3])  # bounds 0, 1, 2, 4
    assert gallery[0]["image"].shape == (3, 8, 6, 3)
    (tmp_path / "query" / "person_a").mkdir()
    with pytest.raises(ValueError, match="person_a"):
        reid.tracklet_folders(tmp_path, "query")
