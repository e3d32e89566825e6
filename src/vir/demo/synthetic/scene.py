"""Scenes of coloured shapes on a grid: sampling, rendering and dense per-cell labels (all pure)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from vir.demo.config import SyntheticConfig

# Saturated colours that stay far apart in RGB on the dark background (and from each other).
PALETTE: Dict[str, Tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 100, 255),
    "yellow": (240, 220, 30),
    "purple": (170, 60, 230),
    "white": (245, 245, 245),
    "orange": (255, 140, 0),
    "cyan": (0, 220, 220),
}
BACKGROUND = (32, 32, 32)
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
SIZES = ("small", "large")
# Half-extent of a shape as a fraction of its cell; large keeps a 1-px margin for jitter on 16-px cells.
HALF_EXTENT = {"small": 0.25, "large": 0.38}


@dataclass(frozen=True)
class SceneObject:
    """One object; `row`/`col` are 0-based grid indices (row 0 is the top), `dx`/`dy` the pixel jitter."""

    colour: str
    shape: str
    size: str
    row: int
    col: int
    dx: int = 0
    dy: int = 0

    @property
    def name(self) -> str:
        """How questions refer to the object: "red circle"."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """Objects in row-major order (reading order, as a ViT sees its patches) on a `grid` x `grid` layout."""

    objects: Tuple[SceneObject, ...]
    grid: int
    colours: Tuple[str, ...]  # the vocabularies the scene was sampled from: they define the label indices
    shapes: Tuple[str, ...]

    def key(self) -> Tuple:
        """Hashable identity of the scene's content (jitter ignored), to keep eval/test apart from train."""
        return tuple((o.colour, o.shape, o.size, o.row, o.col) for o in self.objects)

    def uniquely_named(self) -> List[SceneObject]:
        """The objects whose name ("red circle") picks exactly one object, in reading order."""
        names = Counter(o.name for o in self.objects)
        return [o for o in self.objects if names[o.name] == 1]

    def to_dict(self) -> Dict[str, Any]:
        return {"grid": self.grid, "objects": [o.__dict__.copy() for o in self.objects]}

    @classmethod
    def from_dict(cls, data: Dict[str, Any], spec: SyntheticConfig) -> "Scene":
        """Inverse of `to_dict` (the vocabularies come from the spec, as in `manifest.json`)."""
        objects = tuple(SceneObject(**o) for o in data["objects"])
        return cls(objects, int(data["grid"]), tuple(spec.colours), tuple(spec.shapes))


def check_spec(spec: SyntheticConfig) -> None:
    """Raise ValueError naming the `demo.synthetic.*` key when the spec cannot produce valid scenes."""
    unknown = [c for c in spec.colours if c not in PALETTE]
    if unknown or len(set(spec.colours)) < 2:
        raise ValueError(
            f"demo.synthetic.colours={list(spec.colours)}: need >=2 distinct colours from {sorted(PALETTE)}"
        )
    unknown = [s for s in spec.shapes if s not in SHAPES]
    if unknown or len(set(spec.shapes)) < 2:
        raise ValueError(f"demo.synthetic.shapes={list(spec.shapes)}: need >=2 distinct shapes from {SHAPES}")
    if not 2 <= spec.min_objects <= spec.max_objects <= spec.grid * spec.grid:
        raise ValueError(
            f"demo.synthetic.min_objects={spec.min_objects}, max_objects={spec.max_objects}: need "
            f"2 <= min_objects <= max_objects <= grid*grid={spec.grid * spec.grid}"
        )
    if spec.image_size < 4 * spec.grid:
        raise ValueError(f"demo.synthetic.image_size={spec.image_size}: need >= 4 px per cell (grid={spec.grid})")


def sample_scene(rng: np.random.Generator, spec: SyntheticConfig) -> Scene:
    """Draw 2..5 (spec.min/max_objects) objects in distinct cells with uniform colour, shape and size."""
    num_cells = spec.grid * spec.grid
    n = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    cells = np.sort(rng.choice(num_cells, size=n, replace=False))
    colours = rng.integers(len(spec.colours), size=n)
    shapes = rng.integers(len(spec.shapes), size=n)
    sizes = rng.integers(len(SIZES), size=n)
    jitter = rng.integers(-spec.jitter, spec.jitter + 1, size=(n, 2)) if spec.jitter > 0 else np.zeros((n, 2))
    objects = tuple(
        SceneObject(
            colour=spec.colours[colours[i]],
            shape=spec.shapes[shapes[i]],
            size=SIZES[sizes[i]],
            row=int(cells[i] // spec.grid),
            col=int(cells[i] % spec.grid),
            dx=int(jitter[i, 0]),
            dy=int(jitter[i, 1]),
        )
        for i in range(n)
    )
    return Scene(objects, spec.grid, tuple(spec.colours), tuple(spec.shapes))


def render_scene(scene: Scene, image_size: int = 64) -> Image.Image:
    """Draw the scene as an RGB `image_size` x `image_size` PIL image (no anti-aliasing: crisp at 64 px)."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = image_size / scene.grid
    for obj in scene.objects:
        cx = (obj.col + 0.5) * cell + obj.dx
        cy = (obj.row + 0.5) * cell + obj.dy
        _draw_shape(draw, obj.shape, cx, cy, HALF_EXTENT[obj.size] * cell, PALETTE[obj.colour])
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, h: float, fill: Sequence[int]) -> None:
    fill = tuple(fill)
    if shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "square":
        s = 0.85 * h  # a square of the same half-extent looks much heavier than the circle
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=fill)
    elif shape == "cross":
        # Integer pixel spans (PIL includes both ends): arms 2 px wide when small, 4 px when large, so a
        # small cross keeps its notches and never reads as a blob next to a small circle.
        w, r = max(1, round(0.3 * h)), round(h)
        x, y = round(cx), round(cy)
        draw.rectangle([x - w, y - r, x + w - 1, y + r - 1], fill=fill)
        draw.rectangle([x - r, y - w, x + r - 1, y + w - 1], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {SHAPES}")


def cell_labels(scene: Scene, grid: Optional[int] = None) -> np.ndarray:
    """Dense targets for a vision tower: int64 `[grid*grid, 4]` in row-major cell (= ViT patch) order.

    Columns: occupied (0/1), colour index, shape index (into `scene.colours`/`scene.shapes`, i.e. the spec's
    lists) and size index (0 small, 1 large); the last three are -1 for empty cells.
    """
    grid = scene.grid if grid is None else grid
    if grid != scene.grid:
        raise ValueError(f"cell_labels: grid={grid} but the scene was sampled on a {scene.grid}x{scene.grid} grid")
    labels = np.full((grid * grid, 4), -1, dtype=np.int64)
    labels[:, 0] = 0
    for obj in scene.objects:
        idx = obj.row * grid + obj.col
        labels[idx] = (1, scene.colours.index(obj.colour), scene.shapes.index(obj.shape), SIZES.index(obj.size))
    return labels


def labelled_scene(rng: np.random.Generator, spec: SyntheticConfig) -> Tuple[Image.Image, np.ndarray]:
    """One on-the-fly training pair for dense vision pretraining: (image, `cell_labels` `[grid*grid, 4]`)."""
    scene = sample_scene(rng, spec)
    return render_scene(scene, spec.image_size), cell_labels(scene)
