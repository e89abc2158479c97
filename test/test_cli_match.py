"""``fmr match`` end to end: JSON fields, visualisation, batch mode over a pairs file, clear failures."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import SAMPLES, load_motorcycle, rotation_error_deg
from feature_matching_ros.cli import main


@pytest.fixture(scope="module")
def stereo_files(tmp_path_factory):
    pair = load_motorcycle()
    folder = tmp_path_factory.mktemp("stereo")
    cv2.imwrite(str(folder / "left.png"), cv2.cvtColor(pair.image0, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(folder / "right.png"), cv2.cvtColor(pair.image1, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(folder / "depth_left.png"), np.round(pair.depth0 * 1000).astype(np.uint16))
    fx, fy, cx, cy = pair.K0[0, 0], pair.K0[1, 1], pair.K0[0, 2], pair.K0[1, 2]
    return folder, pair, f"{fx},{fy},{cx},{cy}", f"{fx},{fy},{pair.K1[0, 2]},{cy}"


def test_match_writes_json_and_visualisation(stereo_files, tmp_path):
    folder, pair, k0, k1 = stereo_files
    out_json, out_png = tmp_path / "out.json", tmp_path / "out.png"
    code = main(["match", str(folder / "left.png"), str(folder / "right.png"), "--detector", "orb", "--descriptor",
                 "aliked", "--matcher", "lightglue", "--max-keypoints", "512", "--resize-max", "512",
                 "--K0", k0, "--K1", k1, "--depth0", str(folder / "depth_left.png"), "--json", str(out_json),
                 "--viz", str(out_png), "--device", "cpu"])
    assert code == 0
    report = json.loads(out_json.read_text())
    for key in ("keypoints0", "keypoints1", "matches", "inliers", "num_inliers", "R", "t", "success", "reason",
                "timing_ms"):
        assert key in report
    assert report["success"] and report["metric_scale"]
    assert len(report["inliers"]) == len(report["matches"]) and report["num_inliers"] == sum(report["inliers"])
    assert np.asarray(report["keypoints0"]).max(0)[0] > 512  # mapped back to the 741 px wide original
    assert rotation_error_deg(np.asarray(report["R"]), pair.R_1_0) < 0.5
    assert np.linalg.norm(np.asarray(report["t"]) - pair.t_1_0) < 0.02
    assert set(report["timing_ms"]) >= {"detect0", "describe0", "detect1", "describe1", "match", "pose"}
    canvas = cv2.imread(str(out_png))
    assert canvas.shape == (500, 741 * 2, 3)
    green = (canvas[:, :, 1] > 200) & (canvas[:, :, 0] < 50) & (canvas[:, :, 2] < 50)
    assert green.sum() > 1000


def test_match_pairs_batch_mode(stereo_files, tmp_path):
    folder, _, k0, k1 = stereo_files
    pairs = tmp_path / "pairs.txt"
    intrinsics = " ".join(k0.split(",") + k1.split(","))
    pairs.write_text(f"# stereo pair, then graf without intrinsics, then a missing file\n"
                     f"{folder / 'left.png'} {folder / 'right.png'} {intrinsics}\n"
                     f"{SAMPLES / 'graf1.jpg'} {SAMPLES / 'graf3.jpg'}\n"
                     f"{folder / 'missing.png'} {folder / 'right.png'}\n")
    out = tmp_path / "out"
    assert main(["match", "--pairs", str(pairs), "--out", str(out), "--descriptor", "disk", "--max-keypoints", "256",
                 "--resize-max", "400", "--device", "cpu"]) == 0
    reports = [json.loads((out / f"{i:05d}.json").read_text()) for i in range(3)]
    assert reports[0]["success"] and not reports[0]["intrinsics_guessed"]
    assert reports[1]["intrinsics_guessed"] and reports[1]["num_matches"] > 20
    assert not reports[2]["success"] and "image not found" in reports[2]["reason"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == 3 and summary["successes"] >= 1


def test_invalid_options_exit_with_message():
    result = subprocess.run([sys.executable, "-m", "feature_matching_ros.cli", "match", "a.png", "b.png",
                             "--detector", "sift", "--descriptor", "native", "--matcher", "lightglue"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no weights for sift descriptors" in result.stderr
    result = subprocess.run([sys.executable, "-m", "feature_matching_ros.cli", "match", "a.png", "b.png",
                             "--detector", "superpoint"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "invalid choice: 'superpoint'" in result.stderr


def test_match_with_eloftr_and_depth_gives_a_metric_pose(stereo_files, tmp_path):
    """`fmr match --matcher eloftr`: semi-dense matches (shipped weights) through the same PnP path as LightGlue."""
    folder, pair, k0, k1 = stereo_files
    out_json, out_png = tmp_path / "eloftr.json", tmp_path / "eloftr.png"
    code = main(["match", str(folder / "left.png"), str(folder / "right.png"), "--matcher", "eloftr",
                 "--resize-max", "480", "--K0", k0, "--K1", k1, "--depth0", str(folder / "depth_left.png"),
                 "--json", str(out_json), "--viz", str(out_png), "--device", "cpu"])
    assert code == 0 and out_png.is_file()
    report = json.loads(out_json.read_text())
    assert report["success"] and report["metric_scale"] and report["method"] == "pnp"
    assert report["num_matches"] == len(report["keypoints0"]) == len(report["matches"]) >= 200
    assert report["config"]["matcher"]["name"] == "eloftr"
    t = np.array(report["t"])
    assert abs(np.linalg.norm(t) - np.linalg.norm(pair.T_1_0[:3, 3])) < 0.02  # metric baseline within 2 cm
    assert rotation_error_deg(np.array(report["R"]), pair.T_1_0[:3, :3]) < 1.0


def test_match_with_loftr_without_weights_is_a_clear_error(stereo_files, capsys):
    folder, _, _, _ = stereo_files
    code = main(["match", str(folder / "left.png"), str(folder / "right.png"), "--matcher", "loftr"])
    assert code == 2
    assert "needs weights=PATH" in capsys.readouterr().err
