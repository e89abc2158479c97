"""ROS 2 shell of feature_matching_ros: message conversions and nodes (the only rclpy importers).

Modules here are thin: they convert messages, read parameters and call the core. ``parameters`` imports
neither rclpy nor message packages, so tests, tools and docs can use it anywhere.
"""

from pkgutil import extend_path as _extend_path

import feature_matching_ros as _package

# The generated interfaces (feature_matching_ros.msg / .srv) live wherever rosidl installed them: next to the
# sources after `colcon build`, but in .venv's site-packages after scripts/build_interfaces.sh while the
# sources are used from the checkout (pip install -e ., or the repository root on sys.path as under pytest).
# Merge every `feature_matching_ros` directory on sys.path into the package so both cases import the same way.
_package.__path__[:] = _extend_path(list(_package.__path__), _package.__name__)
