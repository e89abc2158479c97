"""``fmr import-sequence``: real photos + TUM poses round-trip through the bag exactly; bad input is refused
before anything is written. Also the loop labellers for real sequences (covisibility, view cone)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from scipy.spatial.transform import Rotation
from skimage import data

from feature_matching_ros.bag.image_folder import read_tum_trajectory, write_tum_trajectory
from feature_matching_ros.bag.sequence import read_sequence
from feature_matching_ros.cli import main
from feature_matching_ros.scenes.loops import (CovisibilityCriteria, ViewConeCriteria, covisibility_loops,
                                               view_cone_loops)

K_TEXT = "300.5,301.25,159.5,119.75"
STAMPS = [1305031102.175304, 1305031102.211214, 1305031102.243211, 1305031102.275326]


def real_photos() -> list[np.ndarray]:
    """Four real photographs (scikit-image), 320x240 RGB."""
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    return [cv2.resize(p, (320, 240), interpolation=cv2.INTER_AREA) for p in photos]


def poses(count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    T = np.tile(np.eye(4), (count, 1, 1))
    T[:, :3, :3] = Rotation.from_rotvec(rng.normal(0, 0.5, (count, 3))).as_matrix()
    T[:, :3, 3] = rng.normal(0, 2.0, (count, 3))
    return T


@pytest.fixture()
def image_folder(tmp_path):
    folder = tmp_path / "rgb"
    folder.mkdir()
    for stamp, photo in zip(STAMPS, real_photos()):
        cv2.imwrite(str(folder / f"{stamp:.6f}.png"), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
    return folder


def test_frames_intrinsics_and_poses_round_trip(tmp_path, image_folder):
    T = poses(4)
    # Pose stamps 5 ms off the image stamps (within --max-dt); the third image has no pose and is left out.
    pose_stamps = np.array(STAMPS) + 0.005
    kept = [0, 1, 3]
    write_tum_trajectory(tmp_path / "gt.tum", pose_stamps[kept], T[kept])
    (tmp_path / "loops.json").write_text(json.dumps([[2, 0]]))
    out = tmp_path / "seq"
    assert main(["import-sequence", str(image_folder), "--K", K_TEXT, "--poses", str(tmp_path / "gt.tum"),
                 "--loops", str(tmp_path / "loops.json"), "--out", str(out)]) == 0
    frames = list(read_sequence(out / "bag"))
    photos = real_photos()
    assert [f.index for f in frames] == [0, 1, 2]
    assert [f.stamp_ns for f in frames] == [round(STAMPS[i] * 1e9) for i in kept]
    for frame, i in zip(frames, kept):
        np.testing.assert_array_equal(frame.image, photos[i])  # PNG in, rgb8 out: lossless
        np.testing.assert_allclose(frame.K, [[300.5, 0, 159.5], [0, 301.25, 119.75], [0, 0, 1]])
        np.testing.assert_allclose(frame.T_map_camera, T[i], atol=1e-8)
        assert frame.T_odom_camera is None and frame.depth is None
    assert json.loads((out / "loops.json").read_text()) == [[2, 0]]
    meta = json.loads((out / "sequence.json").read_text())
    assert meta["frames"] == 3 and meta["images_without_pose_left_out"] == 1
    assert meta["gt_loop_queries"] == 1 and meta["topics_present"]["ground_truth_pose"]


@pytest.mark.parametrize("image_format", ["jpeg", "png"])
def test_compressed_images_round_trip(tmp_path, image_folder, image_format):
    """--image-format writes sensor_msgs/CompressedImage on image_transport's topic; every reader decodes it."""
    from rosbags.rosbag2 import Reader

    out = tmp_path / "seq"
    assert main(["import-sequence", str(image_folder), "--K", K_TEXT, "--out", str(out),
                 "--image-format", image_format]) == 0
    with Reader(out / "bag") as reader:
        types = {c.topic: c.msgtype for c in reader.connections}
    assert types["/camera/image_raw/compressed"] == "sensor_msgs/msg/CompressedImage"
    assert "/camera/image_raw" not in types
    frames = list(read_sequence(out / "bag"))
    assert len(frames) == 4
    for frame, photo in zip(frames, real_photos()):
        assert frame.image.shape == photo.shape and frame.image.dtype == np.uint8
        error = np.abs(frame.image.astype(int) - photo).mean()
        if image_format == "png":
            assert error == 0  # lossless, and RGB order kept
        else:
            assert error < 3.0  # JPEG at quality 95; a channel swap would be ~30 on these photos
        np.testing.assert_allclose(frame.K, [[300.5, 0, 159.5], [0, 301.25, 119.75], [0, 0, 1]])
    assert json.loads((out / "sequence.json").read_text())["image_format"] == image_format


def test_undecodable_compressed_images_are_refused():
    from feature_matching_ros.bag import convert

    message = convert.image_to_compressed_msg(real_photos()[0], 1, "camera")
    message.data = message.data[:100]  # a truncated JPEG
    with pytest.raises(ValueError, match="could not be decoded"):
        convert.compressed_msg_to_image(message)
    message.format = "16UC1; compressedDepth png"
    with pytest.raises(ValueError, match="compressed depth"):
        convert.compressed_msg_to_image(message)


def test_downscaling_scales_intrinsics_with_pixel_centres(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    photo = cv2.resize(data.astronaut(), (800, 600), interpolation=cv2.INTER_AREA)
    for k in range(2):
        cv2.imwrite(str(folder / f"{k:06d}.png"), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
    out = tmp_path / "seq"
    main(["import-sequence", str(folder), "--K", "500,500,399.5,299.5", "--rate", "10", "--max-long-side", "400",
          "--out", str(out)])
    frames = list(read_sequence(out / "bag"))
    assert frames[0].image.shape == (300, 400, 3)
    # The principal point at the image centre stays at the centre: 0.5 * (399.5 + 0.5) - 0.5 = 199.5.
    np.testing.assert_allclose(frames[0].K, [[250, 0, 199.5], [0, 250, 149.5], [0, 0, 1]])
    assert frames[1].stamp_ns - frames[0].stamp_ns == 100_000_000
    assert frames[0].T_map_camera is None


@pytest.mark.parametrize("extra, message", [
    (["--K", "300,300,160"], "fx,fy,cx,cy"),
    (["--K", "0,300,160,120"], "positive focal"),
    (["--K", K_TEXT, "--loops", "LOOPS"], "match < query"),
])
def test_bad_input_is_refused_before_writing(tmp_path, image_folder, extra, message, capsys):
    (tmp_path / "loops.json").write_text(json.dumps([[0, 2]]))
    extra = [str(tmp_path / "loops.json") if a == "LOOPS" else a for a in extra]
    out = tmp_path / "seq"
    with pytest.raises(SystemExit) as error:
        main(["import-sequence", str(image_folder), "--out", str(out), *extra])
    assert message in str(error.value)
    assert not (out / "bag").exists()


def test_frame_numbers_need_a_rate_and_one_pose_per_image(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for k, photo in enumerate(real_photos()[:2]):
        cv2.imwrite(str(folder / f"{k:06d}.png"), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
    with pytest.raises(SystemExit, match="--rate"):
        main(["import-sequence", str(folder), "--K", K_TEXT, "--out", str(tmp_path / "a")])
    write_tum_trajectory(tmp_path / "one.tum", np.array([0.0]), poses(1))
    with pytest.raises(SystemExit, match="one pose per image"):
        main(["import-sequence", str(folder), "--K", K_TEXT, "--rate", "5", "--poses", str(tmp_path / "one.tum"),
              "--out", str(tmp_path / "b")])


def test_tum_reader_rejects_malformed_lines(tmp_path):
    path = tmp_path / "bad.tum"
    path.write_text("# comment\n0.0 1 2 3 0 0 0 1\n0.1 1 2 3 0 0 0.5 0.5\n")
    with pytest.raises(ValueError, match=r"bad.tum:3: quaternion"):
        read_tum_trajectory(path)
    path.write_text("0.0 1 2 3 0 0 0\n")
    with pytest.raises(ValueError, match=r"bad.tum:1: expected"):
        read_tum_trajectory(path)


def test_covisibility_loops_need_shared_points_and_a_time_gap():
    points = [set(range(0, 100)), set(range(50, 150)), None, set(range(1000, 1100)), set(range(10, 100))]
    stamps = np.arange(5) * 10.0
    criteria = CovisibilityCriteria(min_shared_points=30, min_overlap=0.5, min_index_gap=2, min_time_gap_s=15.0)
    # 4 sees 90 of frame 0's 100 points; 1 is too close in index to 0; 3 sees another place; 2 is unregistered.
    assert covisibility_loops(points, stamps, criteria) == [(4, 0), (4, 1)]
    strict = CovisibilityCriteria(min_shared_points=30, min_overlap=0.6, min_index_gap=2, min_time_gap_s=15.0)
    assert covisibility_loops(points, stamps, strict) == [(4, 0)]  # 40 of 100 shared with frame 1
    # Frames that are a subset of a longer sequence: the index gap counts in sequence positions.
    assert covisibility_loops(points[:2], stamps[:2], criteria, indices=[0, 1]) == []
    assert covisibility_loops(points[:2], stamps[[0, 4]], criteria, indices=[0, 9]) == [(1, 0)]


def test_view_cone_loops_need_close_centres_and_parallel_axes():
    T = np.tile(np.eye(4), (4, 1, 1))
    T[1, :3, 3] = (0, 0, 30.0)
    T[2, :3, 3] = (1.0, 0, 0)  # back near frame 0, same heading
    T[3, :3, 3] = (0, 0, 1.0)
    T[3, :3, :3] = Rotation.from_euler("y", 90, degrees=True).as_matrix()  # near frame 0, looking sideways
    criteria = ViewConeCriteria(max_distance_m=5.0, max_axis_angle_deg=20.0, min_index_gap=2, min_time_gap_s=0.0)
    assert view_cone_loops(T, np.arange(4.0), criteria) == [(2, 0)]
