"""Every reason the engine can produce maps to a stable code (ros/reason_codes.py).

The reasons are found in the engine's SOURCES (ast), so a reason added later without a code fails here:
the leading literal text of every string given as a failure reason -- RelativePose(False, ...),
Relocalization(False, ...), KeyframeResult(..., reason, ...), ``x.reason = ...``, ``reason = ...`` and the
returns of reason-returning checks (functions annotated ``-> str | None``) -- in every core module that deals
with poses or loops. Likewise every error sentence that rejects a keyframe's map points must map to a
``map_points_*`` code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from feature_matching_ros.ros.reason_codes import MAP_POINTS_CODES, VERIFICATION_FAILED, ReasonCode, reason_code

PACKAGE = Path(__file__).resolve().parents[1] / "feature_matching_ros"


def _leading_text(node: ast.AST) -> list[str]:
    """Leading literal text of a string expression (both branches of a conditional)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        text = ""
        for part in node.values:
            if not (isinstance(part, ast.Constant) and isinstance(part.value, str)):
                break
            text += part.value
        return [text]
    if isinstance(node, ast.IfExp):
        return _leading_text(node.body) + _leading_text(node.orelse)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _leading_text(node.left)
    return []


def _engine_reasons() -> dict[str, str]:
    """{leading text: 'file:line'} of every reason literal in the core modules that produce verdicts."""
    reasons: dict[str, str] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "ros" in path.relative_to(PACKAGE).parts[:1]:
            continue
        source = path.read_text()
        if "RelativePose" not in source and "LoopClosure" not in source and "Relocalization" not in source:
            continue
        tree = ast.parse(source)
        found: list[ast.AST] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", ""))
                if name in ("RelativePose", "Relocalization") and len(node.args) >= 2 and \
                        isinstance(node.args[0], ast.Constant) and node.args[0].value is False:
                    found.append(node.args[1])
                if name == "KeyframeResult" and len(node.args) >= 4:
                    found.append(node.args[3])
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    if (isinstance(target, ast.Attribute) and target.attr == "reason") or \
                            (isinstance(target, ast.Name) and target.id == "reason"):
                        found.append(node.value)
            elif isinstance(node, ast.FunctionDef) and node.returns is not None and \
                    ast.unparse(node.returns).replace(" ", "") == "str|None":
                found += [n.value for n in ast.walk(node) if isinstance(n, ast.Return) and n.value is not None]
        for expression in found:
            for text in _leading_text(expression):
                if text.startswith(VERIFICATION_FAILED):
                    continue  # the wrapper: its tail is a pose reason, found on its own
                reasons.setdefault(text, f"{path.relative_to(PACKAGE)}:{expression.lineno}")
    return reasons


def test_the_scan_finds_the_engine_reasons():
    reasons = _engine_reasons()
    assert len(reasons) >= 20, sorted(reasons)
    assert any(text.startswith("inlier ratio") for text in reasons)


@pytest.mark.parametrize("text, where", sorted(_engine_reasons().items()))
def test_every_engine_reason_has_a_code(text, where):
    assert reason_code(text) is not ReasonCode.OTHER, f"{where}: reason {text!r} has no code in reason_codes.py"


# The functions whose error sentences become the reason of a rejected Keyframe.map_points, and the calls that carry
# them: ValueError in the bag layer's converter, the node conversion's own error helper.
MAP_POINTS_SOURCES = (("bag/convert.py", "msg_to_map_points", "ValueError"),
                      ("ros/conversions.py", "cloud_to_map_points", "_map_points_error"))


def _map_points_reasons() -> dict[str, str]:
    """{leading text: 'file:line'} of every error sentence raised for unusable map points."""
    reasons: dict[str, str] = {}
    for relative, function, error in MAP_POINTS_SOURCES:
        tree = ast.parse((PACKAGE / relative).read_text())
        body = next(node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == function)
        for node in ast.walk(body):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == error and node.args:
                for text in _leading_text(node.args[0]):
                    reasons.setdefault(text, f"{relative}:{node.lineno}")
    return reasons


def test_the_scan_finds_the_map_point_reasons():
    assert len(_map_points_reasons()) >= 4, _map_points_reasons()


@pytest.mark.parametrize("text, where", sorted(_map_points_reasons().items()))
def test_every_map_points_reason_has_a_map_points_code(text, where):
    assert reason_code(text) in MAP_POINTS_CODES, f"{where}: reason {text!r} has no map_points_* code"


@pytest.mark.parametrize("reason, code", [
    ("inlier ratio 0.44 < min_inlier_ratio=0.5", ReasonCode.LOW_INLIER_RATIO),
    ("geometric verification failed: too few matches with valid depth: 3 < 15", ReasonCode.TOO_FEW_DEPTH_MATCHES),
    ("geometric verification failed: too few matches: 3 < min_matches=15", ReasonCode.TOO_FEW_MATCHES),
    ("geometric verification failed: too few inliers in front of both cameras: 4", ReasonCode.CHEIRALITY),
    ("too few inliers: 12 < min_inliers=50", ReasonCode.TOO_FEW_INLIERS),
    ("geometric verification failed: degenerate: planar scene; homography explains 90 of 95 essential inliers, "
     "monocular pose is ambiguous", ReasonCode.DEGENERATE),
    ("no candidate verified (kf 3: too few inliers: 2 < min_inliers=20)", ReasonCode.NO_CANDIDATE_VERIFIED),
    ("ok", ReasonCode.OK),
    ("something new the engine never said", ReasonCode.OTHER),
    ("map point cloud lacks float32 fields ['y', 'z'] (needs u, v, x, y, z)", ReasonCode.MAP_POINTS_MISSING_FIELDS),
    ("map points contain NaN or infinite values (1 of 2 points)", ReasonCode.MAP_POINTS_NOT_FINITE),
])
def test_reason_examples(reason, code):
    assert reason_code(reason) is code
    assert reason_code(reason).value.isidentifier()  # usable as a counter / diagnostics key
