"""Start relocalization_node with a parameter preset from config/<preset>.yaml.

    ros2 launch feature_matching_ros relocalize.launch.py preset:=cpu namespace:=robot1 \
        image:=/camera/color/image_raw camera_info:=/camera/color/camera_info depth:=/camera/depth/image_rect \
        keyframes:=/slam/keyframes device:=cuda

Arguments:
  preset       config/<preset>.yaml in share/feature_matching_ros (orb_lightglue, aliked_lightglue, cpu,
               xfeat_lightglue, eloftr); each names a preset of feature_matching_ros/presets.py and sets the
               node's own parameters
  params_file  optional extra parameter file applied after the preset file (overrides it), e.g. with
               pipeline.* / engine.* overrides or map_path
  namespace    namespace of the node and its relative topics
  device       auto | cpu | cuda; empty keeps the preset's value (sets pipeline.device)
  image_qos    sensor_data | reliable; empty keeps the preset file's (reliable for a reliable camera publisher:
               large images sent best effort are often lost)
  image, camera_info, depth, keyframes, loop_candidates   input topic remaps
  log_level    debug | info | warn | error
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

PACKAGE = "feature_matching_ros"
EXECUTABLE = "relocalization_node"
TOPIC_ARGUMENTS = ("image", "camera_info", "depth", "keyframes", "loop_candidates")


def _node(context, *args, **kwargs):
    """Resolve the preset path at launch time so an unknown preset fails with the list of valid ones."""
    config_dir = os.path.join(get_package_share_directory(PACKAGE), "config")
    preset = LaunchConfiguration("preset").perform(context)
    preset_file = os.path.join(config_dir, f"{preset}.yaml")
    if not os.path.isfile(preset_file):
        available = sorted(name[:-5] for name in os.listdir(config_dir) if name.endswith(".yaml"))
        raise RuntimeError(f"preset:={preset} not found in {config_dir}; available: {', '.join(available)}")
    parameters = [preset_file]
    params_file = LaunchConfiguration("params_file").perform(context)
    if params_file:
        parameters.append(params_file)
    device = LaunchConfiguration("device").perform(context)
    if device:
        parameters.append({"pipeline.device": device})
    image_qos = LaunchConfiguration("image_qos").perform(context)
    if image_qos:
        parameters.append({"image_qos": image_qos})
    remappings = [(topic, LaunchConfiguration(topic).perform(context)) for topic in TOPIC_ARGUMENTS]
    return [Node(
        package=PACKAGE,
        executable=EXECUTABLE,
        name=EXECUTABLE,
        namespace=LaunchConfiguration("namespace").perform(context),
        parameters=parameters,
        remappings=remappings,
        arguments=["--ros-args", "--log-level", LaunchConfiguration("log_level").perform(context)],
        output="screen",
        emulate_tty=True,
    )]


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription([
        DeclareLaunchArgument("preset", default_value="orb_lightglue",
                              description="Preset: config/<preset>.yaml"),
        DeclareLaunchArgument("params_file", default_value="",
                              description="Extra parameter file applied after the preset"),
        DeclareLaunchArgument("namespace", default_value="", description="Node namespace"),
        DeclareLaunchArgument("device", default_value="", description="auto | cpu | cuda (empty: preset's)"),
        DeclareLaunchArgument("image_qos", default_value="",
                              description="sensor_data | reliable (empty: the preset file's)"),
        DeclareLaunchArgument("image", default_value="image", description="Camera image topic"),
        DeclareLaunchArgument("camera_info", default_value="camera_info", description="Camera info topic"),
        DeclareLaunchArgument("depth", default_value="depth", description="Depth image topic (16UC1 mm / 32FC1 m)"),
        DeclareLaunchArgument("keyframes", default_value="keyframes", description="Keyframe topic of the SLAM backend"),
        DeclareLaunchArgument("loop_candidates", default_value="loop_candidates",
                              description="Loop candidate requests (feature_matching_ros/LoopCandidates)"),
        DeclareLaunchArgument("log_level", default_value="info", description="debug | info | warn | error"),
        OpaqueFunction(function=_node),
    ])
