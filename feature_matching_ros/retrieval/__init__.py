"""Place recognition: global descriptors (VLAD, bag of binary words), keyframe database, map persistence."""

from feature_matching_ros.retrieval.database import (Candidate, Keyframe, KeyframeDatabase, MapPoints,
                                                     RetrievalConfig)
from feature_matching_ros.retrieval.global_descriptors import (BinaryVocabulary, CodebookError, VladCodebook,
                                                               default_codebook_path, load_codebook, save_codebook)
from feature_matching_ros.retrieval.persistence import MapFormatError, load_map, save_map

__all__ = ["BinaryVocabulary", "Candidate", "CodebookError", "Keyframe", "KeyframeDatabase", "MapFormatError",
           "MapPoints", "RetrievalConfig", "VladCodebook", "default_codebook_path", "load_codebook", "load_map",
           "save_codebook", "save_map"]
