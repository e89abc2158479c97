"""Exact-depth CPU ray caster for scenes made of textured rectangles (walls, floors, boxes, posters).

Why a ray caster in numpy and not pyrender / moderngl / pybullet / blender: those need system GL
(EGL + Mesa llvmpipe) or a 200 MB blender install, their depth comes back through a non-linear z-buffer
(float32 after a perspective divide, so "exact" depth is only approximately invertible), and GL
rasterisation on llvmpipe is not guaranteed bit-identical across driver versions or thread counts.
Our geometry is planar (rooms, corridors, facades, boxes), so a per-pixel ray/plane intersection is
closed-form: for a pinhole ray ``X = o + z * R @ [(u - cx)/fx, (v - cy)/fy, 1]`` the hit depth ``z`` (the
optical-axis depth, exactly what the depth image stores) and the quad's texture coordinates are
ratios of functions that are *linear in the pixel coordinates*, so a quad costs a few vectorised
multiply-adds over its screen bounding box. Pure numpy + OpenCV (already dependencies), pip-only,
deterministic (no threads, no GL), and the depth is exact up to float32 rounding.

Rendering model:
- visibility: nearest hit over all quads (z-buffer over their near-plane-clipped screen bounding boxes);
- texture: mirrored-repeat tiling (no seams), trilinear mip-mapping with the pixel footprint on the
  surface ``z / f / sqrt(|cos(incidence)|)`` (between the isotropic and the fully anisotropic choice:
  little aliasing on floors without blurring them to mush);
- light: Lambertian, view independent (ambient + point lights with soft inverse-square falloff + an
  optional sun with a sky term), so the same surface point has the same colour from every view --
  which is what makes the photometric ground-truth check possible; no shadows. Because it is smooth
  and view independent it is baked once per quad side into a 20 cm lightmap (bilinear lookup), which
  made shading ~3x cheaper than per-pixel lighting in the corridor (30+ lamps);
- sky: pixels without a hit get a direction-dependent gradient and depth NaN (invalid).
Pixel convention: (0, 0) is the centre of the top-left pixel. Poses ``T_a_b`` map points from b to a.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from feature_matching_ros.scenes.textures import MipTexture, load_mip_texture

NEAR_PLANE_M = 0.05
LIGHTMAP_CELL_M = 0.2  # lighting is smooth and view independent: baked per quad on this grid


@dataclass(frozen=True)
class Quad:
    """A textured rectangle ``origin + a * edge_u + b * edge_v`` for a, b in [0, 1].

    ``edge_u`` runs left->right and ``edge_v`` top->bottom as seen from the front, so image rows of the
    texture run along ``edge_v``. ``tile_m`` is the size in metres of one texture repeat along ``edge_u``
    (the repeat along ``edge_v`` keeps the photo's aspect ratio). ``tile_m=None`` stretches the photo
    once over the whole quad (posters). ``tint`` multiplies the albedo; ``phase`` shifts the tiling (in
    tiles) so that neighbouring walls with the same texture do not line up unless a builder wants them to.
    """

    origin: tuple[float, float, float]
    edge_u: tuple[float, float, float]
    edge_v: tuple[float, float, float]
    texture: str
    tile_m: float | None = None
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    phase: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class PointLight:
    position: tuple[float, float, float]
    color: tuple[float, float, float]
    intensity: float
    falloff_m: float = 4.0  # distance at which the light has dropped to half


@dataclass
class Scene:
    """Everything the renderer needs. ``sun_direction`` points *from* the sun (world frame, z up)."""

    name: str
    quads: list[Quad] = field(default_factory=list)
    lights: list[PointLight] = field(default_factory=list)
    ambient: tuple[float, float, float] = (0.35, 0.35, 0.35)
    sun_direction: tuple[float, float, float] | None = None
    sun_color: tuple[float, float, float] = (0.0, 0.0, 0.0)
    sky_ambient: tuple[float, float, float] = (0.0, 0.0, 0.0)
    sky_zenith: tuple[float, float, float] = (0.35, 0.55, 0.9)
    sky_horizon: tuple[float, float, float] = (0.8, 0.85, 0.9)


@dataclass
class RenderResult:
    """``rgb``: (H, W, 3) float32 linear radiance * exposure (not clipped); ``depth``: (H, W) float32
    metres along the optical axis, NaN where no surface; ``quad_id``: (H, W) int32, -1 for sky."""

    rgb: np.ndarray
    depth: np.ndarray
    quad_id: np.ndarray

    def rgb8(self) -> np.ndarray:
        return np.clip(np.rint(self.rgb * 255.0), 0, 255).astype(np.uint8)


@dataclass
class _PreparedQuad:
    origin: np.ndarray
    edge_u: np.ndarray
    edge_v: np.ndarray
    normal: np.ndarray  # unit, front side
    len_u: float
    len_v: float
    texture: MipTexture
    tiles_u: float  # texture repeats along edge_u
    tiles_v: float
    tint: np.ndarray
    phase: np.ndarray
    lightmaps: np.ndarray  # (2, n_v, n_u, 3) irradiance on the front (0) and back (1) side, grid over a, b


def intrinsics_matrix(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def default_intrinsics(width: int, height: int, hfov_deg: float = 70.0) -> np.ndarray:
    """Square-pixel pinhole with the principal point at the image centre (pixel-centre convention)."""
    fx = 0.5 * width / np.tan(np.radians(hfov_deg) / 2.0)
    return intrinsics_matrix(fx, fx, (width - 1) / 2.0, (height - 1) / 2.0)


class Renderer:
    """Renders a Scene from arbitrary poses. Prepares the quads once; ``render`` is re-entrant."""

    def __init__(self, scene: Scene):
        self.scene = scene
        self._quads: list[_PreparedQuad] = []
        for quad in scene.quads:
            origin, edge_u, edge_v = (np.asarray(x, dtype=np.float64) for x in (quad.origin, quad.edge_u, quad.edge_v))
            len_u, len_v = float(np.linalg.norm(edge_u)), float(np.linalg.norm(edge_v))
            if len_u <= 0 or len_v <= 0 or abs(np.dot(edge_u, edge_v)) > 1e-6 * len_u * len_v:
                raise ValueError(f"quad edges must be non-zero and orthogonal: {quad}")
            texture = load_mip_texture(quad.texture)
            if quad.tile_m is None:
                tiles_u, tiles_v = 1.0, 1.0
            else:
                tiles_u = len_u / quad.tile_m
                tiles_v = len_v / (quad.tile_m * texture.height / texture.width)
            normal = np.cross(edge_v, edge_u) / (len_u * len_v)
            self._quads.append(
                _PreparedQuad(
                    origin, edge_u, edge_v, normal, len_u, len_v, texture, tiles_u, tiles_v,
                    np.asarray(quad.tint, np.float32), np.asarray(quad.phase, np.float64),
                    self._bake_lightmaps(origin, edge_u, edge_v, normal, len_u, len_v),
                )
            )

    def _bake_lightmaps(self, origin, edge_u, edge_v, normal, len_u, len_v) -> np.ndarray:
        n_u = int(np.ceil(len_u / LIGHTMAP_CELL_M)) + 1
        n_v = int(np.ceil(len_v / LIGHTMAP_CELL_M)) + 1
        a, b = np.meshgrid(np.linspace(0, 1, n_u), np.linspace(0, 1, n_v))
        points = (origin + a[..., None] * edge_u + b[..., None] * edge_v).reshape(-1, 3).astype(np.float32)
        maps = [self._irradiance(points, np.broadcast_to(sign * normal.astype(np.float32), points.shape))
                for sign in (1.0, -1.0)]
        return np.stack(maps).reshape(2, n_v, n_u, 3)

    # -- visibility -------------------------------------------------------------------------------
    def _screen_box(self, quad: _PreparedQuad, K: np.ndarray, R_cw: np.ndarray, t_cw: np.ndarray,
                    width: int, height: int) -> tuple[int, int, int, int] | None:
        """Pixel bounding box (x0, x1, y0, y1, exclusive ends) of the quad clipped to the near plane."""
        corners_w = np.stack([quad.origin, quad.origin + quad.edge_u, quad.origin + quad.edge_u + quad.edge_v,
                              quad.origin + quad.edge_v])
        corners_c = corners_w @ R_cw.T + t_cw
        # Sutherland-Hodgman against z >= near: keeps the polygon exact where it crosses the near plane.
        clipped = []
        for i in range(4):
            p, q = corners_c[i], corners_c[(i + 1) % 4]
            p_in, q_in = p[2] >= NEAR_PLANE_M, q[2] >= NEAR_PLANE_M
            if p_in:
                clipped.append(p)
            if p_in != q_in:
                s = (NEAR_PLANE_M - p[2]) / (q[2] - p[2])
                clipped.append(p + s * (q - p))
        if not clipped:
            return None
        pts = np.asarray(clipped)
        uv = (pts[:, :2] / pts[:, 2:3]) * [K[0, 0], K[1, 1]] + [K[0, 2], K[1, 2]]
        x0 = max(0, int(np.floor(uv[:, 0].min())))
        x1 = min(width, int(np.ceil(uv[:, 0].max())) + 1)
        y0 = max(0, int(np.floor(uv[:, 1].min())))
        y1 = min(height, int(np.ceil(uv[:, 1].max())) + 1)
        if x0 >= x1 or y0 >= y1:
            return None
        return x0, x1, y0, y1

    def render(self, K: np.ndarray, T_world_camera: np.ndarray, width: int, height: int,
               exposure: float = 1.0) -> RenderResult:
        """Render the scene. ``T_world_camera`` is the optical-frame pose (x right, y down, z forward)."""
        K = np.asarray(K, dtype=np.float64)
        T = np.asarray(T_world_camera, dtype=np.float64)
        if K.shape != (3, 3) or T.shape != (4, 4):
            raise ValueError("K must be 3x3 and T_world_camera 4x4")
        if width <= 0 or height <= 0:
            raise ValueError("width and height must be positive")
        R_wc, t_wc = T[:3, :3], T[:3, 3]
        R_cw, t_cw = R_wc.T, -R_wc.T @ t_wc
        fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
        # Camera-frame ray direction (z = 1) is linear in the pixel: d = [(u - cx)/fx, (v - cy)/fy, 1].
        us = np.arange(width, dtype=np.float32)
        vs = np.arange(height, dtype=np.float32)[:, None]
        depth = np.full((height, width), np.inf, np.float32)
        quad_id = np.full((height, width), -1, np.int32)
        coord_a = np.zeros((height, width), np.float32)
        coord_b = np.zeros((height, width), np.float32)

        def linear(vec_c: np.ndarray, x0: int, x1: int, y0: int, y1: int) -> np.ndarray:
            # vec_c . d(u, v) as a broadcast sum of a row and a column term.
            row = np.float32(vec_c[0] / fx) * (us[x0:x1] - np.float32(cx))
            col = np.float32(vec_c[1] / fy) * (vs[y0:y1] - np.float32(cy)) + np.float32(vec_c[2])
            return row + col

        for index, quad in enumerate(self._quads):
            box = self._screen_box(quad, K, R_cw, t_cw, width, height)
            if box is None:
                continue
            x0, x1, y0, y1 = box
            normal_c = R_cw @ quad.normal
            plane_offset = float(quad.normal @ (quad.origin - t_wc))  # n . (p0 - o)
            if abs(plane_offset) < 1e-9:
                continue  # camera exactly in the plane: the quad is seen edge-on
            denom = linear(normal_c, x0, x1, y0, y1)
            with np.errstate(divide="ignore", invalid="ignore"):
                z = np.float32(plane_offset) / denom
            rel_origin = t_wc - quad.origin
            a = (np.float32(quad.edge_u @ rel_origin) + z * linear(R_cw @ quad.edge_u, x0, x1, y0, y1)) * np.float32(
                1.0 / quad.len_u**2)
            b = (np.float32(quad.edge_v @ rel_origin) + z * linear(R_cw @ quad.edge_v, x0, x1, y0, y1)) * np.float32(
                1.0 / quad.len_v**2)
            z_old = depth[y0:y1, x0:x1]
            hit = (z > NEAR_PLANE_M) & (z < z_old) & (a >= 0) & (a <= 1) & (b >= 0) & (b <= 1)
            if not hit.any():
                continue
            depth[y0:y1, x0:x1] = np.where(hit, z, z_old)
            quad_id[y0:y1, x0:x1][hit] = index
            coord_a[y0:y1, x0:x1][hit] = a[hit]
            coord_b[y0:y1, x0:x1][hit] = b[hit]

        rgb = self._shade(K, R_wc, t_wc, depth, quad_id, coord_a, coord_b, us, vs)
        depth[quad_id < 0] = np.nan
        return RenderResult(rgb * np.float32(exposure), depth, quad_id)

    # -- shading ----------------------------------------------------------------------------------
    def _shade(self, K, R_wc, t_wc, depth, quad_id, coord_a, coord_b, us, vs) -> np.ndarray:
        height, width = depth.shape
        fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
        rgb = np.empty((height * width, 3), np.float32)
        flat_id = quad_id.ravel()
        # Camera-frame ray directions for all pixels (z = 1), then world directions.
        dir_c = np.empty((height * width, 3), np.float32)
        dir_c[:, 0] = np.broadcast_to((us - np.float32(cx)) / np.float32(fx), (height, width)).ravel()
        dir_c[:, 1] = np.broadcast_to((vs - np.float32(cy)) / np.float32(fy), (height, width)).ravel()
        dir_c[:, 2] = 1.0

        sky = np.flatnonzero(flat_id < 0)
        if sky.size:
            dir_w = dir_c[sky] @ R_wc.T.astype(np.float32)
            elevation = np.clip(dir_w[:, 2] / np.linalg.norm(dir_w, axis=1), 0.0, 1.0)[:, None]
            zenith = np.asarray(self.scene.sky_zenith, np.float32)
            horizon = np.asarray(self.scene.sky_horizon, np.float32)
            rgb[sky] = horizon + (zenith - horizon) * np.sqrt(elevation)

        order = np.argsort(flat_id, kind="stable")
        sorted_ids = flat_id[order]
        starts = np.searchsorted(sorted_ids, np.arange(len(self._quads) + 1))
        focal = float(np.sqrt(fx * fy))
        flat_depth, flat_a, flat_b = depth.ravel(), coord_a.ravel(), coord_b.ravel()
        for index, quad in enumerate(self._quads):
            pix = order[starts[index]:starts[index + 1]]
            if pix.size == 0:
                continue
            z = flat_depth[pix]
            dir_w = dir_c[pix] @ R_wc.T.astype(np.float32)
            normal = quad.normal.astype(np.float32)
            # cos_view > 0: the camera sees the back side (quads are two-sided, each side lit on its own).
            cos_view = dir_w @ normal / np.sqrt(np.einsum("ij,ij->i", dir_w, dir_w))
            abs_cos = np.maximum(np.abs(cos_view), 1e-3)
            footprint_m = z / np.float32(focal) / np.sqrt(abs_cos)
            texels_per_m = quad.texture.width * quad.tiles_u / quad.len_u
            level = np.log2(np.maximum(footprint_m * np.float32(texels_per_m), 1e-6))
            albedo = _sample_trilinear(quad.texture, flat_a[pix] * np.float32(quad.tiles_u) + np.float32(quad.phase[0]),
                                       flat_b[pix] * np.float32(quad.tiles_v) + np.float32(quad.phase[1]), level)
            light = _sample_lightmap(quad.lightmaps, flat_a[pix], flat_b[pix], cos_view > 0)
            rgb[pix] = albedo * quad.tint * light
        return rgb.reshape(height, width, 3)

    def _irradiance(self, points: np.ndarray, normals: np.ndarray) -> np.ndarray:
        scene = self.scene
        light = np.broadcast_to(np.asarray(scene.ambient, np.float32), points.shape).copy()
        for lamp in scene.lights:
            to_light = np.asarray(lamp.position, np.float32) - points
            dist = np.linalg.norm(to_light, axis=1)
            cos_in = np.maximum((to_light * normals).sum(axis=1) / np.maximum(dist, 1e-6), 0.0)
            gain = np.float32(lamp.intensity) * cos_in / (1.0 + (dist / np.float32(lamp.falloff_m)) ** 2)
            light += gain[:, None] * np.asarray(lamp.color, np.float32)
        if scene.sun_direction is not None:
            sun = -np.asarray(scene.sun_direction, np.float32)
            sun /= np.linalg.norm(sun)
            light += np.maximum(normals @ sun, 0.0)[:, None] * np.asarray(scene.sun_color, np.float32)
            # Sky light: up-facing surfaces see more of the sky dome.
            light += (0.5 + 0.5 * normals[:, 2:3]) * np.asarray(scene.sky_ambient, np.float32)
        return light


def _sample_lightmap(lightmaps: np.ndarray, a: np.ndarray, b: np.ndarray, back: np.ndarray) -> np.ndarray:
    """Bilinear lookup in the baked (2, n_v, n_u, 3) lightmaps at quad coordinates a, b in [0, 1]."""
    _, n_v, n_u, _ = lightmaps.shape
    x = np.clip(a, 0, 1) * np.float32(n_u - 1)
    y = np.clip(b, 0, 1) * np.float32(n_v - 1)
    x0 = np.minimum(x.astype(np.int64), n_u - 2) if n_u > 1 else np.zeros(x.shape, np.int64)
    y0 = np.minimum(y.astype(np.int64), n_v - 2) if n_v > 1 else np.zeros(y.shape, np.int64)
    fx = (x - x0)[:, None]
    fy = (y - y0)[:, None]
    flat = lightmaps.reshape(-1, 3)
    base = back.astype(np.int64) * (n_v * n_u) + y0 * n_u + x0
    x1 = np.minimum(1, n_u - 1)
    y1 = np.minimum(1, n_v - 1) * n_u
    top = flat[base] * (1 - fx) + flat[base + x1] * fx
    bottom = flat[base + y1] * (1 - fx) + flat[base + y1 + x1] * fx
    return top * (1 - fy) + bottom * fy


def _mirror_index(index: np.ndarray, size: int) -> np.ndarray:
    """Mirrored-repeat addressing: ... 2 1 0 | 0 1 2 ... size-1 | size-1 ... (seamless tiling)."""
    period = np.mod(index, 2 * size)
    return np.where(period >= size, 2 * size - 1 - period, period)


def _sample_bilinear(image: np.ndarray, tex_u: np.ndarray, tex_v: np.ndarray) -> np.ndarray:
    """Bilinear lookup at texture coordinates in tiles (1.0 = one texture width), mirrored repeat."""
    height, width = image.shape[:2]
    # Texel centres sit at (i + 0.5) / size in tile units.
    x = tex_u * np.float32(width) - np.float32(0.5)
    y = tex_v * np.float32(height) - np.float32(0.5)
    x0f, y0f = np.floor(x), np.floor(y)
    fx, fy = (x - x0f)[:, None], (y - y0f)[:, None]
    x0, y0 = x0f.astype(np.int64), y0f.astype(np.int64)
    xa, xb = _mirror_index(x0, width), _mirror_index(x0 + 1, width)
    ya, yb = _mirror_index(y0, height) * width, _mirror_index(y0 + 1, height) * width
    flat = image.reshape(-1, 3)
    top = flat[ya + xa] * (1 - fx) + flat[ya + xb] * fx
    bottom = flat[yb + xa] * (1 - fx) + flat[yb + xb] * fx
    return top * (1 - fy) + bottom * fy


def _sample_trilinear(texture: MipTexture, tex_u: np.ndarray, tex_v: np.ndarray, level: np.ndarray) -> np.ndarray:
    level = np.clip(level, 0.0, len(texture.levels) - 1.0)
    lower = np.floor(level).astype(np.int64)
    frac = (level - lower).astype(np.float32)
    out = np.empty((tex_u.size, 3), np.float32)
    for k in np.unique(lower):
        sel = np.flatnonzero(lower == k)
        fine = _sample_bilinear(texture.levels[k], tex_u[sel], tex_v[sel])
        if k + 1 < len(texture.levels):
            coarse = _sample_bilinear(texture.levels[k + 1], tex_u[sel], tex_v[sel])
            w = frac[sel][:, None]
            out[sel] = fine * (1 - w) + coarse * w
        else:
            out[sel] = fine
    return out
