"""launch/relocalize.launch.py: static checks everywhere, a real launch where launch_ros is installed.

Static (ast, no launch import): every executable the launch file starts is a console script in pyproject.toml
AND a node installed by CMakeLists.txt (lib/feature_matching_ros/), the default preset and every preset in
config/ exist and only set parameters the node declares, and parameter dicts in the launch file name declared
parameters. The launch test runs the launch description with launch_ros (ROS 2 Jazzy/Kilted install) and
checks the node comes up and answers; PyPI has no launch/launch_ros, so it skips there with that reason.
"""

from __future__ import annotations

import ast
import os
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from feature_matching_ros.ros.parameters import PARAMETER_NAMES, flatten_parameter_file

REPO = Path(__file__).resolve().parents[1]
LAUNCH_FILE = REPO / "launch" / "relocalize.launch.py"
CONFIG_DIR = REPO / "config"


def _launch_tree() -> ast.Module:
    return ast.parse(LAUNCH_FILE.read_text(), filename=str(LAUNCH_FILE))


def _constants(tree: ast.Module) -> dict[str, object]:
    """Module-level NAME = <literal> assignments."""
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return values


def _resolve(node: ast.AST, constants: dict[str, object]):
    if isinstance(node, ast.Name) and node.id in constants:
        return constants[node.id]
    return ast.literal_eval(node)


def _node_calls(tree: ast.Module) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "Node"]


def _launch_arguments(tree: ast.Module) -> dict[str, str]:
    arguments = {}
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "DeclareLaunchArgument":
            name = ast.literal_eval(call.args[0])
            default = next((ast.literal_eval(k.value) for k in call.keywords if k.arg == "default_value"), None)
            arguments[name] = default
    return arguments


def test_launch_executables_are_installed_both_ways():
    tree = _launch_tree()
    constants = _constants(tree)
    calls = _node_calls(tree)
    assert calls, "the launch file starts no launch_ros Node"
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    cmake = (REPO / "CMakeLists.txt").read_text()
    cmake_nodes = re.search(r"set\(FMR_NODES ([^)]*)\)", cmake).group(1).split()
    for call in calls:
        keywords = {k.arg: k.value for k in call.keywords}
        package = _resolve(keywords["package"], constants)
        executable = _resolve(keywords["executable"], constants)
        assert package == "feature_matching_ros"
        assert executable in scripts, f"{executable} is not a console script in pyproject.toml"
        module = scripts[executable].split(":")[0]
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), f"{module} does not exist"
        assert executable in cmake_nodes, f"{executable} is not installed to lib/feature_matching_ros by CMake"
    assert "install(DIRECTORY launch config DESTINATION share/${PROJECT_NAME})" in cmake


def test_launch_arguments_and_presets():
    tree = _launch_tree()
    arguments = _launch_arguments(tree)
    for name in ("preset", "namespace", "device", "image", "camera_info", "depth", "keyframes"):
        assert name in arguments, f"launch argument {name} is missing"
    assert (CONFIG_DIR / f"{arguments['preset']}.yaml").is_file(), "default preset has no config file"
    constants = _constants(tree)
    for topic in constants["TOPIC_ARGUMENTS"]:
        assert topic in arguments
    node_source = "".join(path.read_text() for path in (REPO / "feature_matching_ros" / "ros").glob("*.py"))
    for topic in constants["TOPIC_ARGUMENTS"]:  # remapped names must be topics the node uses
        assert f'"{topic}"' in node_source, f"the node has no topic {topic!r} to remap"
    # parameters set by dict literals in the launch file (e.g. {"device": device}) must be declared
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key in node.keys:
                if isinstance(key, ast.Constant) and isinstance(key.value, str):
                    assert key.value in PARAMETER_NAMES, f"launch file sets undeclared parameter {key.value}"


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_config_files_name_a_preset_and_set_only_declared_valid_parameters(preset):
    """config/<name>.yaml selects presets.py's <name> (the one place preset values live), sets node parameters
    and explicit pipeline.* / engine.* overrides only, with the declared types, and the result validates."""
    from feature_matching_ros.presets import build_configs, preset_names
    from feature_matching_ros.ros.parameters import SPECS, preset_override

    data = yaml.safe_load((CONFIG_DIR / f"{preset}.yaml").read_text())
    (node_key, block), = data.items()
    assert node_key in ("/**", "relocalization_node", "/**/relocalization_node")
    values = flatten_parameter_file(block["ros__parameters"])
    undeclared = set(values) - PARAMETER_NAMES
    assert not undeclared, f"{preset}.yaml sets undeclared parameters {sorted(undeclared)}"
    assert values.get("preset") == preset, f"{preset}.yaml must select preset: {preset}"
    assert preset in preset_names(), f"config/{preset}.yaml has no preset {preset!r} in presets.py"
    for name, value in values.items():  # rclpy refuses a value whose type differs from the declared type
        assert type(value) is SPECS[name].type, (
            f"{preset}.yaml: {name}={value!r} is {type(value).__name__}, declared {SPECS[name].type.__name__}")
        spec = SPECS[name]
        if spec.choices:
            assert value in spec.choices, f"{preset}.yaml: {name}={value!r}; allowed {spec.choices}"
        if spec.value_range:
            assert spec.value_range[0] <= value <= spec.value_range[1], f"{preset}.yaml: {name}={value!r}"
    build_configs(preset, preset_override(values))  # raises ConfigError if an override is invalid


def test_every_preset_override_key_is_a_declared_parameter():
    """Every scalar key of every preset can be overridden by a declared pipeline.* / engine.* parameter."""
    from feature_matching_ros.presets import PRESETS
    from feature_matching_ros.ros.parameters import SPECS

    for name, preset in PRESETS.items():
        for key in flatten_parameter_file(preset):
            assert key in SPECS and SPECS[key].override_key, f"preset {name}: {key} has no override parameter"


def test_launch_with_launch_ros(tmp_path):
    """Start the node from the launch file and call its service (needs a ROS 2 install with launch_ros)."""
    launch_ros = pytest.importorskip("launch_ros", reason="launch_ros is not installed (not on PyPI; ROS 2 only)")
    import launch
    import rclpy
    ament_packages = pytest.importorskip("ament_index_python.packages",
                                         reason="ament_index_python is not installed (ROS 2 only)")

    if not os.environ.get("AMENT_PREFIX_PATH"):
        pytest.skip("feature_matching_ros is not indexed by ament: AMENT_PREFIX_PATH is not set (source the "
                    "workspace's install/setup.bash, or export AMENT_PREFIX_PATH=<prefix>)")
    try:
        share = ament_packages.get_package_share_directory("feature_matching_ros")
    except (ament_packages.PackageNotFoundError, LookupError, OSError) as error:
        pytest.skip(f"feature_matching_ros is not indexed by ament under AMENT_PREFIX_PATH ({error}; colcon build, "
                    "or scripts/build_interfaces.sh)")
    if not os.path.isfile(os.path.join(share, "launch", "relocalize.launch.py")):
        pytest.skip(f"the launch file is not installed in {share} (pip install -e . installs no data files; "
                    "colcon build or pip install . does)")
    import random
    import threading

    from launch.actions import IncludeLaunchDescription
    from launch.launch_description_sources import PythonLaunchDescriptionSource

    os.environ["ROS_DOMAIN_ID"] = str(random.randint(1, 100))
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    service = launch.LaunchService()
    service.include_launch_description(IncludeLaunchDescription(
        PythonLaunchDescriptionSource(os.path.join(share, "launch", "relocalize.launch.py")),
        launch_arguments={"preset": "cpu", "namespace": "launch_test"}.items()))
    outcome: dict[str, object] = {}

    def client_side() -> None:
        # LaunchService must run in the main thread; the client runs here and ends the launch when done.
        context = rclpy.Context()
        rclpy.init(context=context)
        try:
            import feature_matching_ros.ros  # noqa: F401  (merges the generated interfaces into the package)
            from feature_matching_ros.srv import SaveMap
            from rclpy.executors import SingleThreadedExecutor
            client_node = rclpy.create_node("launch_test_client", context=context)
            client = client_node.create_client(SaveMap, "/launch_test/save_map")
            if not client.wait_for_service(timeout_sec=120.0):
                outcome["error"] = "node started by the launch file did not come up"
                return
            future = client.call_async(SaveMap.Request(path=str(tmp_path / "map")))
            executor = SingleThreadedExecutor(context=context)
            executor.add_node(client_node)
            executor.spin_until_future_complete(future, timeout_sec=30.0)
            outcome["response"] = future.result()
            executor.shutdown()
            client_node.destroy_node()
        except Exception as error:  # reported by the assertion below
            outcome["error"] = repr(error)
        finally:
            rclpy.shutdown(context=context)
            service.shutdown()

    thread = threading.Thread(target=client_side)
    thread.start()
    service.run()
    thread.join(timeout=30.0)
    assert "error" not in outcome, outcome["error"]
    assert outcome["response"].success, outcome["response"].message
    assert launch_ros is not None


# Third-party modules the package imports at run time -> the rosdep key package.xml must list for each.
RUNTIME_IMPORTS = {"numpy": "python3-numpy", "scipy": "python3-scipy", "cv2": "python3-opencv", "yaml": "python3-yaml",
                   "torch": "python3-torch", "kornia": "python3-kornia-pip", "safetensors": "python3-safetensors-pip",
                   "faiss": "python3-faiss", "threadpoolctl": "python3-threadpoolctl-pip", "skimage": "python3-skimage",
                   "rosbags": "python3-rosbags-pip", "matplotlib": "python3-matplotlib", "gtsam": "python3-gtsam-pip",
                   "rclpy": "rclpy", "message_filters": "message_filters", "rcl_interfaces": "rcl_interfaces",
                   "builtin_interfaces": "builtin_interfaces", "std_msgs": "std_msgs", "sensor_msgs": "sensor_msgs",
                   "geometry_msgs": "geometry_msgs", "diagnostic_msgs": "diagnostic_msgs",
                   "visualization_msgs": "visualization_msgs", "ament_index_python": "ament_index_python"}
# Imported only by training / data preparation (not needed to run the node or fmr evaluate), or test-only.
NOT_RUNTIME = {"h5py", "transformers", "mcap", "pycolmap", "pytest", "tqdm"}  # tqdm: optional progress bars
# Keys defined by ros/rosdistro rosdep/{base,python}.yaml (checked there) or by ROS packages themselves.
ROSDISTRO_KEYS = {"python3-numpy", "python3-scipy", "python3-opencv", "python3-yaml", "python3-torch",
                  "python3-kornia-pip", "python3-faiss", "python3-skimage", "python3-rosbags-pip",
                  "python3-matplotlib", "python3-pytest", "python3-catkin-pkg"}


def test_package_xml_lists_every_runtime_dependency_with_a_resolvable_rosdep_key():
    catkin_package = pytest.importorskip("catkin_pkg.package", reason="catkin_pkg is not installed")
    package = catkin_package.parse_package(str(REPO / "package.xml"))
    package.validate()  # catkin_pkg's own checks (format 3, maintainers, licenses)
    exec_keys = {d.name for d in package.exec_depends + package.build_export_depends}
    imported = set()
    for path in (REPO / "feature_matching_ros").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    import sys

    third_party = {name for name in imported if name not in sys.stdlib_module_names
                   and name not in ("feature_matching_ros", "__future__")}
    unknown = third_party - set(RUNTIME_IMPORTS) - NOT_RUNTIME
    assert not unknown, f"imports without a rosdep key in this test's table: {sorted(unknown)}"
    missing = {RUNTIME_IMPORTS[name] for name in third_party & set(RUNTIME_IMPORTS)} - exec_keys
    assert not missing, f"package.xml lacks exec_depend for {sorted(missing)}"
    own_keys = set(yaml.safe_load((REPO / "rosdep" / "python.yaml").read_text()))
    python_keys = {key for key in exec_keys | {d.name for d in package.test_depends} if key.startswith("python3-")}
    unresolvable = python_keys - ROSDISTRO_KEYS - own_keys
    assert not unresolvable, f"rosdep keys neither in rosdistro nor in rosdep/python.yaml: {sorted(unresolvable)}"
    for key in own_keys:
        assert key.endswith("-pip") and key not in ROSDISTRO_KEYS
