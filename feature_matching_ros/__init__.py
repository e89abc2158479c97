"""feature_matching_ros: visual loop closure and relocalization for ROS 2.

The core library (everything except :mod:`feature_matching_ros.ros`) never imports rclpy, so the same
code runs in the ROS nodes, in ``fmr evaluate`` over a bag, and in the training scripts.
"""

# The rosidl-generated ``msg``/``srv`` subpackages are installed into site-packages while the Python sources
# stay editable in the checkout; extend_path lets ``feature_matching_ros.msg`` resolve from either location.
__path__ = __import__("pkgutil").extend_path(__path__, __name__)

__version__ = "0.1.0"
