"""relocalization_node's services: match_images, relocalize, save_map, load_map (a mixin of the node class).

Each handler converts the request like the topics do (the node's ``_frame`` / ``_camera`` / ``_undistort``: same
validation, intrinsics and undistortion), answers bad input with success=false and the reason (and counts it),
and shares the engine with the worker thread through ``_engine_lock``. SaveMap never removes or overwrites
anything it did not write (retrieval/persistence.py ``check_save_target``); LoadMap is all or nothing.
"""

from __future__ import annotations

import os
import time

import numpy as np
from sensor_msgs.msg import CameraInfo, Image

from feature_matching_ros.image import ImageError
from feature_matching_ros.msg import Matches
from feature_matching_ros.retrieval.persistence import MapFormatError, MapTargetError
from feature_matching_ros.ros import conversions as conv
from feature_matching_ros.ros import messages
from feature_matching_ros.ros.camera_model import CameraModel
from feature_matching_ros.srv import LoadMap, MatchImages, Relocalize, SaveMap


class NodeServices:
    """Service handlers; the node class provides engine, _engine_lock, health, map_frame, _frame, _camera,
    _undistort, _relocalize, _count, _reject, _latency, _debug_images, _accepted_loops and get_logger."""

    def _service_image(self, image_msg: Image, info: CameraInfo, what: str
                       ) -> tuple[np.ndarray, np.ndarray, CameraModel]:
        image = conv.image_to_numpy(image_msg, conv.IMAGE_ENCODINGS, what)
        model = self._camera(info, image)
        return self._undistort(np.asarray(image), model), model.K, model

    def _on_match_images(self, request: MatchImages.Request, response: MatchImages.Response) -> MatchImages.Response:
        self._count("match_images_requests")
        try:
            image0, K0, model0 = self._service_image(request.image0, request.camera_info0, "image0")
            image1, K1, model1 = self._service_image(request.image1, request.camera_info1, "image1")
            depth0 = conv.depth_to_metres(request.depth0, "depth0")
            depth1 = conv.depth_to_metres(request.depth1, "depth1")
            depth0 = None if depth0 is None else self._undistort(depth0, model0, nearest=True)
            depth1 = None if depth1 is None else self._undistort(depth1, model1, nearest=True)
            start = time.perf_counter()
            with self._engine_lock, self.engine.network_lock:
                result = self.engine.pipeline.match_pair(image0, image1, K0, K1, depth0, depth1)
            self._latency.add("match_images", (time.perf_counter() - start) * 1e3)
        except conv.ConversionError as error:
            self._reject(error.kind, f"match_images: {error}")
            response.success, response.reason = False, f"{error.kind}: {error}"
            return response
        except (ImageError, ValueError) as error:
            self._reject("image_error", f"match_images: {error}")
            response.success, response.reason = False, f"image_error: {error}"
            return response
        points0, points1 = result.matched_points()
        inliers = result.pose.inliers if len(result.pose.inliers) == len(result.matches) else np.zeros(
            len(result.matches), bool)
        response.matches = Matches(header=request.image0.header, frame_id0=request.image0.header.frame_id,
                                   frame_id1=request.image1.header.frame_id,
                                   points0=np.ascontiguousarray(points0, np.float32).ravel(),
                                   points1=np.ascontiguousarray(points1, np.float32).ravel(),
                                   scores=np.ascontiguousarray(result.scores, np.float32),
                                   inliers=[bool(v) for v in inliers])
        response.t_1_0 = conv.matrix_to_transform(result.pose.T_1_0)
        response.metric_scale = bool(result.pose.metric)
        response.information = np.asarray(result.pose.information, np.float64).ravel()
        response.success, response.reason = bool(result.success), result.reason
        return response

    def _on_relocalize(self, request: Relocalize.Request, response: Relocalize.Response) -> Relocalize.Response:
        self._count("relocalize_requests")
        depth = request.depth if (request.depth.width or len(request.depth.data)) else None
        try:
            frame = self._frame(0, request.image.header, request.image, request.camera_info, depth, "")
            result = self._relocalize(frame)
        except conv.ConversionError as error:
            self._reject(error.kind, f"relocalize: {error}")
            response.success, response.reason = False, f"{error.kind}: {error}"
            return response
        except (ImageError, ValueError) as error:
            self._reject("image_error", f"relocalize: {error}")
            response.success, response.reason = False, f"image_error: {error}"
            return response
        response.success, response.reason = bool(result.success), result.reason
        best = messages.best_candidate(result)
        if best is not None:
            response.keyframe_id = int(best.match_id)
            response.num_matches, response.num_inliers = int(best.num_matches), int(best.num_inliers)
        if result.success:
            response.pose = messages.pose_msg(result, request.image.header, self.map_frame)
        return response

    def _on_save_map(self, request: SaveMap.Request, response: SaveMap.Response) -> SaveMap.Response:
        """Save the map to a directory; refuses (success=false + why) a relative path or a target holding
        anything the node did not write, so no request can destroy data (persistence.check_save_target)."""
        if not os.path.isabs(request.path):
            response.success = False
            response.message = (f"refused: {request.path!r} is not an absolute path (it would be resolved against "
                                "the node's working directory, not the caller's)")
            self._count("map.save_refused")
            self.get_logger().error(response.message)
            return response
        try:
            with self._engine_lock:
                path = self.engine.save_map(request.path)
                count = len(self.engine.database)
            response.success, response.message = True, f"saved {count} keyframes to {path}"
            self._count("map.saved")
        except MapTargetError as error:
            response.success, response.message = False, f"refused to save to {request.path!r}: {error}"
            self._count("map.save_refused")
            self.get_logger().error(response.message)
        except (OSError, ValueError, MapFormatError) as error:
            response.success, response.message = False, f"cannot save to {request.path!r}: {error}"
            self._count("map.save_failed")
            self.get_logger().error(response.message)
        return response

    def _on_load_map(self, request: LoadMap.Request, response: LoadMap.Response) -> LoadMap.Response:
        try:
            with self._engine_lock:
                self.engine.load_map(request.path)  # all or nothing: a failed load keeps the current map
                count = len(self.engine.database)
                self._debug_images.clear()  # cached images and loops belong to the previous map
                self._accepted_loops.clear()
        except (MapFormatError, OSError, ValueError, KeyError) as error:
            response.success, response.message = False, f"cannot load {request.path!r}: {error}"
            self._count("map.load_failed")
            self.health.map_load_failed(response.message)
            self.get_logger().error(response.message)
            return response
        self._count("map.loaded")
        self.health.map_loaded()
        response.success, response.message = True, f"loaded {count} keyframes from {request.path}"
        return response
