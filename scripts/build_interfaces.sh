#!/usr/bin/env bash
# Build the ROS 2 interfaces (msg/, srv/) of feature_matching_ros with rosidl and install them, the node
# executables (lib/feature_matching_ros/), launch/ and config/ (share/feature_matching_ros/) into .venv.
#
# Idempotent: re-running rebuilds only what changed. Needs the ROS 2 Kilted wheels from requirements.txt
# and `pip install -e .`; afterwards no environment variables are needed to import
# feature_matching_ros.msg / .srv (the Python sources stay editable in the source tree, see
# cmake/editable_init.py.in). For ament_index lookups (launch files) export AMENT_PREFIX_PATH=$VENV.
#
# Usage: scripts/build_interfaces.sh [path/to/venv]   (default: .venv next to this repository's root)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv}"
PYTHON="$VENV/bin/python"
BUILD_DIR="$ROOT/build/venv_interfaces"

if [[ ! -x "$PYTHON" ]]; then
  echo "build_interfaces.sh: no Python at $PYTHON; create the venv first (scripts/setup.sh)" >&2
  exit 1
fi

# Build-time wheels the ROS metapackages do not pull in (rosidl generators, ament_cmake).
"$PYTHON" -m pip install --quiet \
  ros-kilted-rosidl-default-generators ros-kilted-rosidl-core-generators \
  ros-kilted-ament-cmake ros-kilted-ament-package \
  ros-kilted-ament-cmake-include-directories ros-kilted-ament-cmake-ros-core catkin-pkg

export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH"
export AMENT_PREFIX_PATH="$VENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
export CMAKE_PREFIX_PATH="$VENV${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"

cmake -S "$ROOT" -B "$BUILD_DIR" \
  -DCMAKE_INSTALL_PREFIX="$VENV" \
  -DCMAKE_BUILD_TYPE=Release \
  -DFMR_PYTHON_EDITABLE=ON \
  -DBUILD_TESTING=OFF \
  -DPython3_EXECUTABLE="$PYTHON"
cmake --build "$BUILD_DIR" -j "$(nproc)"
cmake --install "$BUILD_DIR" > "$BUILD_DIR/install.log"

# Check the result from a neutral directory (so the source tree is not on sys.path by accident).
(cd / && "$PYTHON" -c "from feature_matching_ros.msg import Keyframe, LoopClosure, Matches, LoopCandidates; \
from feature_matching_ros.srv import MatchImages, Relocalize, SaveMap, LoadMap; \
import feature_matching_ros.pipeline; print('feature_matching_ros interfaces installed in $VENV')")
