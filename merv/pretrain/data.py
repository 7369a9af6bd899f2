"""Pretext data for the tiny encoders, generated in memory from its own seed (never the benchmark's videos).

- **Appearance** (for the per-frame encoder): single frames of one solid-coloured object from a family of eight
  shapes, at a random size and place, on a random texture. Labels: the shape and the object's hue in 12 bins.
- **Motion** (for the video encoder): clips of one object moving on a static random texture. The object's shape,
  size and fill (a random colour or a random texture) are random, so colour and shape carry no information about
  the label: the direction of motion (8 compass directions or still) at each temporal position of the encoder. The
  path is piecewise straight, with 1-3 legs (turns at random tubelet boundaries) and a random speed.

Frames are uint8 ``[T, S, S, 3]`` like decoded video, so the encoder's own ``transform`` prepares them as it does
in MERV.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle", "triangle_down", "diamond", "plus", "ring", "bar")
HUE_BINS = 12  # bins centred on multiples of 30 degrees (bin 0 is red)
COVERED = 0.25  # share of a patch the object must cover for the patch's token to carry the object's label
MASK_CELLS = 4  # the object mask each token predicts: MASK_CELLS x MASK_CELLS cells of its patch
# still, then the eight compass directions as unit steps (x right, y down)
DIRECTIONS = ("still", "E", "NE", "N", "NW", "W", "SW", "S", "SE")
_UNIT = np.array([[0.0, 0.0]] + [[np.cos(a), -np.sin(a)] for a in np.arange(8) * np.pi / 4]).round(12)  # exact zeros


@dataclass(frozen=True)
class PretextBatch:
    """``frames [B, T, S, S, 3]`` uint8 and integer labels by name (``[B]`` per clip or ``[B, T']`` per position)."""

    frames: np.ndarray
    labels: dict[str, np.ndarray]


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of ``shape`` of radius ``r`` at offsets ``(dx, dy)`` from its centre (y grows downwards)."""
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (ax <= 0.85 * r) & (ay <= 0.85 * r)
    if shape == "triangle":  # apex up
        return (dy >= -r) & (dy <= 0.8 * r) & (ax <= (dy + r) / np.sqrt(3))
    if shape == "triangle_down":
        return (dy <= r) & (dy >= -0.8 * r) & (ax <= (r - dy) / np.sqrt(3))
    if shape == "diamond":
        return ax + ay <= 1.1 * r
    if shape == "plus":
        return ((ax <= 0.35 * r) & (ay <= r)) | ((ay <= 0.35 * r) & (ax <= r))
    if shape == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if shape == "bar":
        return (ax <= r) & (ay <= 0.4 * r)
    raise ValueError(f"unknown pretext shape {shape!r}; known: {SHAPES}")


def random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random texture faded towards a random grey, so the object stands out as objects in real footage do."""
    grey = rng.uniform(60, 200)
    return grey + rng.uniform(0.15, 0.6) * (texture(rng, size) - grey)


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random texture ``[size, size, 3]`` float in 0..255: smooth colour noise, stripes, checks or noisy flat."""
    kind = rng.integers(4)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == 0:
        cells = int(rng.integers(2, 9))
        low = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
        return np.asarray(Image.fromarray(low).resize((size, size), Image.BILINEAR), dtype=np.float32)
    a, b = random_colour(rng), random_colour(rng)
    if kind == 1:
        angle, period = rng.uniform(0, np.pi), rng.uniform(3, 12)
        on = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period) > 0
    elif kind == 2:
        cell = int(rng.integers(2, 11))
        on = ((xx // cell + yy // cell) % 2).astype(bool)
    else:
        on = np.zeros((size, size), dtype=bool)
        b = a
    out = np.where(on[..., None], a, b)
    return np.clip(out + rng.normal(0, rng.uniform(0, 20), size=out.shape), 0, 255)


def patch_coverage(masks: np.ndarray, grid: int) -> np.ndarray:
    """Share of each of ``grid x grid`` patches that boolean ``masks [..., S, S]`` cover: ``[..., grid * grid]``."""
    *lead, size, _ = masks.shape
    cells = masks.reshape(*lead, grid, size // grid, grid, size // grid).mean(axis=(-3, -1))
    return cells.reshape(*lead, grid * grid)


def token_labels(classes: np.ndarray, coverage: np.ndarray) -> np.ndarray:
    """Per-token labels: ``class + 1`` where the object covers at least a quarter of the patch, else 0 (background)."""
    return np.where(coverage >= COVERED, classes[..., None] + 1, 0)


def patch_masks(masks: np.ndarray, grid: int) -> np.ndarray:
    """The object mask inside each patch at ``MASK_CELLS x MASK_CELLS`` cells (a cell is set when the object covers
    half of it): ``[..., S, S]`` -> ``[..., grid * grid, MASK_CELLS ** 2]`` of 0/1."""
    *lead, size, _ = masks.shape
    cell = size // (grid * MASK_CELLS)
    cells = masks.reshape(*lead, grid, MASK_CELLS, cell, grid, MASK_CELLS, cell).mean(axis=(-4, -1)) >= 0.5
    cells = np.moveaxis(cells, -3, -2)  # [..., grid_y, grid_x, cell_y, cell_x]
    return cells.reshape(*lead, grid * grid, MASK_CELLS**2).astype(np.float32)


def appearance_batch(rng: np.random.Generator, n: int, size: int, grid: int) -> PretextBatch:
    """``n`` single frames of one solid object; labels ``shape`` and ``hue`` (bin of the object's hue) per frame,
    per patch token (``shape_map``, ``hue_map``: 0 where the object does not cover the patch), and the object's
    outline: the mask inside each patch (``object_mask``, a figure-ground segmentation)."""
    frames = np.empty((n, 1, size, size, 3), dtype=np.uint8)
    shapes, hues = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    masks = np.empty((n, 1, size, size), dtype=bool)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for i in range(n):
        shapes[i] = rng.integers(len(SHAPES))
        hue = rng.random()
        hues[i] = int(round(hue * HUE_BINS)) % HUE_BINS
        colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))) * 255
        r = rng.uniform(0.09, 0.25) * size
        cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
        masks[i, 0] = mask = shape_mask(SHAPES[shapes[i]], xx - cx, yy - cy, r)
        frame = background(rng, size)
        frame[mask] = colour
        frames[i, 0] = frame.round().astype(np.uint8)
    coverage = patch_coverage(masks, grid)  # [n, 1, grid^2]
    labels = {"shape": shapes, "hue": hues}
    labels |= {f"{k}_map": token_labels(v[:, None], coverage) for k, v in labels.items()}
    labels["object_mask"] = patch_masks(masks, grid)  # [n, 1, grid^2, cells]
    return PretextBatch(frames, labels)


def motion_path(
    rng: np.random.Generator, num_frames: int, size: int, r: float, tubelet: int
) -> tuple[np.ndarray, np.ndarray]:
    """Centres ``[T, 2]`` of a path that stays on screen, straight within each tubelet, turning (or stopping) at
    1-3 random tubelet boundaries; and the direction class of each frame step ``[T - 1]`` (0 still, 1-8 compass)."""
    steps, positions = num_frames - 1, num_frames // tubelet
    for _ in range(100):
        legs = int(rng.integers(1, min(3, positions) + 1))
        turns = np.sort(rng.choice(np.arange(1, positions), size=legs - 1, replace=False)) * tubelet
        classes = np.empty(steps, dtype=np.int64)
        for leg, (start, end) in enumerate(zip(np.r_[0, turns], np.r_[turns, steps], strict=True)):
            previous = classes[start - 1] if leg else -1
            classes[start:end] = rng.choice([c for c in range(len(DIRECTIONS)) if c != previous])
        speed = rng.uniform(0.04, 0.09) * size  # pixels per frame
        moves = _UNIT[classes] * speed
        path = np.concatenate([np.zeros((1, 2)), np.cumsum(moves, axis=0)])
        lo, hi = path.min(0), path.max(0)
        room = size - 2 * (r + 1) - (hi - lo)
        if (room >= 0).all():
            start = r + 1 - lo + rng.uniform(0, 1, size=2) * room
            return path + start, classes
    raise RuntimeError(f"no motion path of {num_frames} frames fits a {size}px frame")  # pragma: no cover


def motion_batch(rng: np.random.Generator, n: int, size: int, num_frames: int, tubelet: int, grid: int) -> PretextBatch:
    """``n`` clips of ``num_frames``; label ``direction [n, num_frames // tubelet]``: the direction of motion during
    each tubelet (the encoder's temporal positions), and ``direction_map [n, T', grid^2]`` per patch token (0 where
    the object does not cover the patch in the tubelet)."""
    if num_frames < 2 or num_frames % tubelet or tubelet < 2:
        raise ValueError(f"motion pretext needs num_frames a multiple of a tubelet >= 2, got {num_frames}/{tubelet}")
    frames = np.empty((n, num_frames, size, size, 3), dtype=np.uint8)
    labels = np.empty((n, num_frames // tubelet), dtype=np.int64)
    masks = np.empty((n, num_frames, size, size), dtype=bool)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for i in range(n):
        r = rng.uniform(0.08, 0.22) * size
        shape = SHAPES[rng.integers(len(SHAPES))]
        centres, classes = motion_path(rng, num_frames, size, r, tubelet)
        labels[i] = classes[::tubelet]
        scene = background(rng, size)
        side = int(np.ceil(2 * r)) + 3
        fill = texture(rng, side) if rng.random() < 0.5 else np.broadcast_to(random_colour(rng), (side, side, 3))
        for t, (cx, cy) in enumerate(centres):
            masks[i, t] = mask = shape_mask(shape, xx - cx, yy - cy, r)
            frame = scene.copy()
            # the fill moves with the object: index it relative to the object's (rounded) centre
            ty = np.clip(yy[mask].astype(int) - int(round(cy)) + side // 2, 0, side - 1)
            tx = np.clip(xx[mask].astype(int) - int(round(cx)) + side // 2, 0, side - 1)
            frame[mask] = fill[ty, tx]
            frames[i, t] = frame.round().astype(np.uint8)
    # a token covers the tubelet's frames: the object's footprint over them
    footprint = masks.reshape(n, num_frames // tubelet, tubelet, size, size).any(axis=2)
    return PretextBatch(
        frames, {"direction": labels, "direction_map": token_labels(labels, patch_coverage(footprint, grid))}
    )


def pretext_batch(
    task: str, rng: np.random.Generator, n: int, size: int, num_frames: int, tubelet: int, grid: int
) -> PretextBatch:
    """A batch of the named pretext task (``appearance`` or ``motion``) for an encoder with a ``grid x grid`` patch
    grid and ``tubelet`` frames per temporal position."""
    if size % (grid * MASK_CELLS):
        raise ValueError(f"pretext render size {size} must be a multiple of {MASK_CELLS} x the patch grid {grid}")
    if task == "appearance":
        return appearance_batch(rng, n, size, grid)
    if task == "motion":
        return motion_batch(rng, n, size, num_frames, tubelet, grid)
    raise ValueError(f"unknown pretext task {task!r}; known: appearance, motion")


def label_classes(task: str) -> dict[str, int]:
    """Outputs of each label of a task: classes, or for ``*_mask`` the binary cells of a token's mask."""
    clip = {"appearance": {"shape": len(SHAPES), "hue": HUE_BINS}, "motion": {"direction": len(DIRECTIONS)}}[task]
    out = clip | {f"{k}_map": n + 1 for k, n in clip.items()}  # per token: 0 = background
    return out | ({"object_mask": MASK_CELLS**2} if task == "appearance" else {})
