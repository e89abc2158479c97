"""Scene builders: office, corridor and street, all laid out as a *ring* around a central block.

Every scene is a rectangle of free space (outer walls / facades facing in) around a central block
(island of desks, inner corridor wall, city block; facing out). The camera route is a rounded rectangle
in the middle of the ring, so a trajectory can circle it several times, in both directions and on
different lanes: that is what produces loop closures, including revisits from another viewpoint and in
the opposite direction.

Look-alikes are deliberate, because they are where real systems close false loops: the corridor uses
one wall texture, identical doors and identical notice boards everywhere, and one poster hung in two
different arms; the office reuses cabinet and desk textures; the street reuses facade photos on several
buildings and has identical parked cars. Layout details (textures, sizes, poster and object placement,
lights, sun) are drawn from the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from feature_matching_ros.scenes.renderer import PointLight, Quad, Scene
from feature_matching_ros.scenes.textures import load_texture_rgb, textures_with_role

SCENE_KINDS = ("office", "corridor", "street")


@dataclass
class SceneLayout:
    """A scene plus what trajectories and loop labels need to know about it.

    ``route_half_size``: half extents (x, y) of the rounded-rectangle route centre line (metres, map frame,
    centred at the origin); ``corner_radius``: its corner radius; ``lane_half_width``: how far the camera may
    leave the centre line sideways; ``camera_height``: metres above the floor.
    ``loop_distance_m``: camera-centre distance below which two frames may count as a loop.
    """

    scene: Scene
    route_half_size: tuple[float, float]
    corner_radius: float
    lane_half_width: float
    camera_height: float
    loop_distance_m: float


def _wall(quads: list[Quad], start_xy, end_xy, z_bottom: float, z_top: float, texture: str, tile_m: float | None,
          tint=(1.0, 1.0, 1.0), phase=(0.0, 0.0), inset: float = 0.0) -> None:
    """Vertical rectangle from start to end (start on the left as seen from the front side).

    The front side is on the right of the start->end direction when seen from above, i.e. a
    counter-clockwise polygon gets outward-facing walls. ``inset`` moves it towards the front (posters on walls).
    """
    start = np.array([start_xy[0], start_xy[1]], float)
    end = np.array([end_xy[0], end_xy[1]], float)
    direction = end - start
    front = np.array([direction[1], -direction[0]]) / np.linalg.norm(direction)
    start = start + inset * front
    quads.append(
        Quad(
            origin=(float(start[0]), float(start[1]), float(z_top)),
            edge_u=(float(direction[0]), float(direction[1]), 0.0),
            edge_v=(0.0, 0.0, float(z_bottom - z_top)),
            texture=texture, tile_m=tile_m, tint=tuple(float(t) for t in tint), phase=tuple(float(p) for p in phase),
        )
    )


def _horizontal(quads: list[Quad], x0: float, x1: float, y0: float, y1: float, z: float, texture: str,
                tile_m: float | None, facing_up: bool, tint=(1.0, 1.0, 1.0), phase=(0.0, 0.0)) -> None:
    if facing_up:  # origin at (x0, y1), u along +x, v along -y -> front normal +z
        quads.append(Quad((x0, y1, z), (x1 - x0, 0.0, 0.0), (0.0, y0 - y1, 0.0), texture, tile_m,
                          tuple(float(t) for t in tint), tuple(float(p) for p in phase)))
    else:
        quads.append(Quad((x0, y0, z), (x1 - x0, 0.0, 0.0), (0.0, y1 - y0, 0.0), texture, tile_m,
                          tuple(float(t) for t in tint), tuple(float(p) for p in phase)))


def _box(quads: list[Quad], center_xy, size_xyz, yaw: float, side_texture: str, top_texture: str,
         tile_m: float | None = None, tint=(1.0, 1.0, 1.0), z_base: float = 0.0) -> None:
    """Axis-rotated box standing on z_base: four outward sides and a top."""
    sx, sy, sz = size_xyz
    c, s = np.cos(yaw), np.sin(yaw)
    local = np.array([[-sx / 2, -sy / 2], [sx / 2, -sy / 2], [sx / 2, sy / 2], [-sx / 2, sy / 2]])  # CCW
    corners = local @ np.array([[c, s], [-s, c]]) + np.asarray(center_xy, float)
    for i in range(4):
        _wall(quads, corners[i], corners[(i + 1) % 4], z_base, z_base + sz, side_texture, tile_m, tint)
    # Top: a rotated horizontal rectangle, u along the box x axis, v along -y (front normal +z).
    origin = corners[3]
    quads.append(Quad((float(origin[0]), float(origin[1]), float(z_base + sz)),
                      (float(corners[2][0] - origin[0]), float(corners[2][1] - origin[1]), 0.0),
                      (float(corners[0][0] - origin[0]), float(corners[0][1] - origin[1]), 0.0),
                      top_texture, tile_m, tuple(float(t) for t in tint)))


def _ring_polygon(half_x: float, half_y: float, ccw: bool) -> list[tuple[float, float]]:
    corners = [(-half_x, -half_y), (half_x, -half_y), (half_x, half_y), (-half_x, half_y)]
    return corners if ccw else corners[::-1]


def _segments(start, end, pieces: int):
    start, end = np.asarray(start, float), np.asarray(end, float)
    for k in range(pieces):
        yield start + (end - start) * k / pieces, start + (end - start) * (k + 1) / pieces


def _light_color(rng: np.random.Generator) -> tuple[float, float, float]:
    """A random colour temperature between warm (~3000 K) and cool (~6500 K) white."""
    warmth = rng.uniform(0.0, 1.0)
    return (1.0, 0.9 + 0.1 * (1 - warmth) - 0.05 * warmth, 0.75 + 0.25 * (1 - warmth))


def _pick(rng: np.random.Generator, names: list[str], count: int | None = None, exclude=()):
    pool = [n for n in names if n not in exclude] or names
    if count is None:
        return pool[int(rng.integers(len(pool)))]
    return [pool[i] for i in rng.permutation(len(pool))[:count]] if count <= len(pool) else [
        pool[int(rng.integers(len(pool)))] for _ in range(count)]


def build_office(rng: np.random.Generator) -> SceneLayout:
    quads: list[Quad] = []
    corridor = 3.2 + rng.uniform(-0.2, 0.3)
    inner = (2.4 + rng.uniform(0.0, 0.8), 1.1 + rng.uniform(0.0, 0.4))
    outer = (inner[0] + corridor, inner[1] + corridor)
    height = 2.9
    wall_texture = _pick(rng, ["moon", "brick", "graffiti"])
    wall_tint = rng.uniform(0.8, 1.1, 3)
    polygon = _ring_polygon(*outer, ccw=False)  # clockwise -> walls face inwards
    for i in range(4):
        _wall(quads, polygon[i], polygon[(i + 1) % 4], 0.0, height, wall_texture, 1.6, wall_tint,
              phase=rng.uniform(0, 2, 2))
    _horizontal(quads, -outer[0], outer[0], -outer[1], outer[1], 0.0, "gravel", 0.9, True, (0.75, 0.72, 0.7))
    _horizontal(quads, -outer[0], outer[0], -outer[1], outer[1], height, "moon", 2.5, False, (1.15, 1.15, 1.15))
    posters = textures_with_role("poster")
    # Posters on the outer walls: mostly unique, plus one printed twice on opposite walls (a look-alike).
    twin = _pick(rng, posters)
    for i in range(4):
        start, end = np.asarray(polygon[i]), np.asarray(polygon[(i + 1) % 4])
        length = float(np.linalg.norm(end - start))
        count = max(1, int(length // 3.5))
        direction = (end - start) / length
        for k in range(count):
            if rng.uniform() < 0.25:
                continue
            texture = twin if (k == 0 and i in (0, 2)) else _pick(rng, posters)
            width = rng.uniform(0.8, 1.4)
            centre = (k + 0.5) * length / count + rng.uniform(-0.3, 0.3)
            bottom = rng.uniform(1.0, 1.3)
            a = start + direction * (centre - width / 2)
            b = start + direction * (centre + width / 2)
            _wall(quads, a, b, bottom, bottom + width * rng.uniform(0.6, 0.9), texture, None, inset=0.01)
    # Shelves along the walls (shallow boxes), and an island of desks, cabinets and screens in the middle.
    objects = textures_with_role("object")
    cabinet_texture = _pick(rng, objects)
    for i in range(4):
        start, end = np.asarray(polygon[i]), np.asarray(polygon[(i + 1) % 4])
        length = float(np.linalg.norm(end - start))
        direction = (end - start) / length
        inward = np.array([direction[1], -direction[0]])
        for _ in range(int(rng.integers(1, 3))):
            along = rng.uniform(1.0, length - 1.0)
            centre = start + direction * along + inward * 0.22
            _box(quads, centre, (rng.uniform(0.6, 1.2), 0.4, rng.uniform(0.8, 1.9)), np.arctan2(direction[1], direction[0]),
                 cabinet_texture, cabinet_texture, 0.6)
    desk_texture = _pick(rng, objects, exclude=(cabinet_texture,))
    nx = max(2, int(inner[0] // 1.3))
    for ix in range(nx):
        for iy in (-1, 1):
            cx = -inner[0] + (ix + 0.5) * 2 * inner[0] / nx
            cy = iy * inner[1] / 2
            kind = rng.uniform()
            if kind < 0.6:
                _box(quads, (cx, cy), (2 * inner[0] / nx - 0.15, inner[1] - 0.1, 0.75), 0.0, desk_texture,
                     _pick(rng, objects), 0.7)
            elif kind < 0.85:
                _box(quads, (cx, cy), (0.8, 0.5, rng.uniform(1.2, 1.9)), rng.uniform(-0.3, 0.3), cabinet_texture,
                     cabinet_texture, 0.6)
            else:
                _box(quads, (cx, cy), (0.6, 0.6, 0.6), rng.uniform(0, np.pi), _pick(rng, objects), _pick(rng, objects))
    # A partition screen down the middle of the island, with a poster on each side.
    _box(quads, (0.0, 0.0), (2 * inner[0] * 0.8, 0.05, 1.6), 0.0, _pick(rng, objects), desk_texture, 0.8)
    lights = []
    for lx in np.linspace(-outer[0] * 0.7, outer[0] * 0.7, 3):
        for ly in (-outer[1] * 0.6, outer[1] * 0.6):
            lights.append(PointLight((float(lx), float(ly), height - 0.1), _light_color(rng), rng.uniform(0.5, 0.9), 3.5))
    scene = Scene("office", quads, lights, ambient=tuple(float(a) for a in rng.uniform(0.25, 0.38) * np.ones(3)))
    half = (inner[0] + corridor / 2, inner[1] + corridor / 2)
    return SceneLayout(scene, half, corridor / 2, corridor * 0.22, 1.4, 2.5)


def build_corridor(rng: np.random.Generator) -> SceneLayout:
    quads: list[Quad] = []
    width = 2.4 + rng.uniform(-0.1, 0.3)
    inner = (7.0 + rng.uniform(0.0, 2.0), 3.5 + rng.uniform(0.0, 1.0))
    outer = (inner[0] + width, inner[1] + width)
    height = 2.8
    # One wall texture, one door texture and one notice board everywhere: a repetitive corridor.
    wall_texture = _pick(rng, ["moon", "brick"])
    wall_tint = (0.95, 0.93, 0.88) if wall_texture == "moon" else (0.85, 0.85, 0.85)
    door_texture = _pick(rng, textures_with_role("object"))
    board_texture = _pick(rng, textures_with_role("poster"))
    posters = [p for p in textures_with_role("poster") if p != board_texture]
    twin_poster = _pick(rng, posters)
    door_spacing = 4.0
    for ring, ccw in ((outer, False), (inner, True)):
        polygon = _ring_polygon(*ring, ccw=ccw)
        for i in range(4):
            start, end = np.asarray(polygon[i]), np.asarray(polygon[(i + 1) % 4])
            _wall(quads, start, end, 0.0, height, wall_texture, 1.2, wall_tint)
            length = float(np.linalg.norm(end - start))
            direction = (end - start) / length
            for k in range(int(length // door_spacing)):
                centre = (k + 0.5) * length / int(length // door_spacing)
                if (k + i) % 3 == 2:  # every third slot holds a notice board or a poster instead of a door
                    texture = twin_poster if (k == 0 and ring is outer and i in (0, 2)) else (
                        board_texture if rng.uniform() < 0.5 else _pick(rng, posters))
                    a, b = start + direction * (centre - 0.5), start + direction * (centre + 0.5)
                    _wall(quads, a, b, 1.1, 1.85, texture, None, inset=0.01)
                else:
                    a, b = start + direction * (centre - 0.45), start + direction * (centre + 0.45)
                    _wall(quads, a, b, 0.0, 2.05, door_texture, None, (0.8, 0.7, 0.6), inset=0.02)
    _horizontal(quads, -outer[0], outer[0], -outer[1], outer[1], 0.0, "gravel", 0.8, True, (0.6, 0.62, 0.65))
    _horizontal(quads, -outer[0], outer[0], -outer[1], outer[1], height, "moon", 2.0, False, (1.2, 1.2, 1.2))
    lights = []
    mid = ((inner[0] + outer[0]) / 2, (inner[1] + outer[1]) / 2)
    color = _light_color(rng)
    for x in np.arange(-mid[0], mid[0] + 0.1, 4.0):
        for y in (-mid[1], mid[1]):
            lights.append(PointLight((float(x), float(y), height - 0.05), color, rng.uniform(0.6, 0.8), 2.5))
    for y in np.arange(-mid[1] + 4.0, mid[1] - 0.1, 4.0):
        for x in (-mid[0], mid[0]):
            lights.append(PointLight((float(x), float(y), height - 0.05), color, rng.uniform(0.6, 0.8), 2.5))
    scene = Scene("corridor", quads, lights, ambient=tuple(float(a) for a in rng.uniform(0.22, 0.32) * np.ones(3)))
    return SceneLayout(scene, mid, width / 2, width * 0.15, 1.5, 3.0)


def build_street(rng: np.random.Generator) -> SceneLayout:
    quads: list[Quad] = []
    street = 11.0 + rng.uniform(-1.0, 2.0)
    inner = (13.0 + rng.uniform(0.0, 4.0), 9.0 + rng.uniform(0.0, 3.0))
    outer = (inner[0] + street, inner[1] + street)
    facades = textures_with_role("facade")
    for ring, ccw in ((outer, False), (inner, True)):
        polygon = _ring_polygon(*ring, ccw=ccw)
        for i in range(4):
            start, end = np.asarray(polygon[i]), np.asarray(polygon[(i + 1) % 4])
            length = float(np.linalg.norm(end - start))
            pieces = max(1, int(round(length / rng.uniform(8.0, 12.0))))
            for a, b in _segments(start, end, pieces):
                # Facade photos are reused across buildings (look-alikes), stretched 1-2x per building.
                # The photo spans the building's height once (upright) and repeats (mirrored) sideways.
                texture = _pick(rng, facades)
                building_height = rng.uniform(7.0, 16.0)
                rows, cols = load_texture_rgb(texture).shape[:2]
                _wall(quads, a, b, 0.0, building_height, texture, building_height * cols / rows,
                      rng.uniform(0.85, 1.1, 3), phase=(rng.uniform(0, 1), 0.0))
    extent = outer[0] + 1.0, outer[1] + 1.0
    _horizontal(quads, -extent[0], extent[0], -extent[1], extent[1], 0.0, "gravel", 1.5, True, (0.45, 0.45, 0.47))
    # Sidewalks (raised 12 cm) along both building lines; road is the ground quad between them.
    walk = 2.5
    for ring, sign in ((outer, -1.0), (inner, 1.0)):
        hx, hy = ring
        w = walk * sign
        strips = [(-hx, hx, -hy, -hy + w), (-hx, hx, hy - w, hy), (-hx, -hx + w, -hy, hy), (hx - w, hx, -hy, hy)]
        for x0, x1, y0, y1 in strips:
            _horizontal(quads, min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1), 0.12, "brick", 0.8, True,
                        (0.8, 0.78, 0.75))
    # Parked cars: identical boxes along the outer sidewalk.
    car_texture = _pick(rng, textures_with_role("object"))
    car_tint = rng.uniform(0.5, 1.0, 3)
    polygon = _ring_polygon(*outer, ccw=False)
    for i in range(4):
        start, end = np.asarray(polygon[i]), np.asarray(polygon[(i + 1) % 4])
        length = float(np.linalg.norm(end - start))
        direction = (end - start) / length
        inward = np.array([direction[1], -direction[0]])
        for along in np.arange(8.0, length - 8.0, rng.uniform(9.0, 14.0)):
            if rng.uniform() < 0.4:
                continue
            centre = start + direction * along + inward * (walk + 1.1)
            _box(quads, centre, (4.2, 1.8, 1.45), np.arctan2(direction[1], direction[0]), car_texture, car_texture,
                 None, car_tint)
    azimuth, elevation = rng.uniform(0, 2 * np.pi), rng.uniform(np.radians(25), np.radians(60))
    sun_direction = (-np.cos(azimuth) * np.cos(elevation), -np.sin(azimuth) * np.cos(elevation), -np.sin(elevation))
    sun_strength = rng.uniform(0.5, 0.8)
    scene = Scene("street", quads, [], ambient=(0.18, 0.18, 0.2), sun_direction=tuple(float(v) for v in sun_direction),
                  sun_color=(sun_strength, sun_strength * 0.95, sun_strength * 0.85),
                  sky_ambient=tuple(float(v) for v in rng.uniform(0.25, 0.35) * np.array([0.9, 0.95, 1.05])))
    mid = (inner[0] + street / 2, inner[1] + street / 2)
    return SceneLayout(scene, mid, street / 2, street * 0.18, 1.6, 6.0)


BUILDERS = {"office": build_office, "corridor": build_corridor, "street": build_street}


def build_scene(kind: str, seed: int) -> SceneLayout:
    """The scene of a given kind for a seed (same seed -> same scene)."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown scene {kind!r}; choose one of {', '.join(SCENE_KINDS)}")
    return BUILDERS[kind](np.random.default_rng([int(seed), SCENE_KINDS.index(kind), 0x5CE7E]))
