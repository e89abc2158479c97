"""The loop-closure and relocalization engine (see engine.py), its configuration and its records."""

from feature_matching_ros.engine.config import EngineConfig
from feature_matching_ros.engine.engine import LoopClosureEngine, build_engine
from feature_matching_ros.engine.records import KeyframeResult, LoopClosure, Relocalization

__all__ = ["EngineConfig", "KeyframeResult", "LoopClosure", "LoopClosureEngine", "Relocalization", "build_engine"]
