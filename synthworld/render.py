"""One synthetic sample: its attribute vocabulary, its ground truth, its rendered image and its captions."""

from __future__ import annotations

import colorsys
import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Single lowercase words: classnames are "<color> <shape>" and zero-shot folders replace the space with
# '_', so no word may contain a space or '_'. Background colours are disjoint from object colours so a
# caption never leaves it unclear which of the two a colour word describes.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "hexagon")
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")
SIZES: tuple[str, ...] = ("small", "medium", "large")
BACKGROUNDS: tuple[str, ...] = ("white", "black", "gray", "beige", "navy")

# Fraction of samples with a second, tiny object: it makes captions with two colour words and images
# with two objects, as real alt-text and photos have.
DISTRACTOR_RATE = 0.25

# (hue, saturation, value) of each object colour. Neighbouring hues (red/orange/pink, cyan/blue) are
# close enough that jitter, blur and JPEG make some samples genuinely ambiguous at 32 px.
_COLOR_HSV: dict[str, tuple[float, float, float]] = {
    "red": (0.0, 0.85, 0.9),
    "orange": (0.075, 0.9, 0.95),
    "yellow": (0.155, 0.85, 0.95),
    "green": (0.33, 0.75, 0.75),
    "cyan": (0.5, 0.75, 0.9),
    "blue": (0.62, 0.8, 0.9),
    "purple": (0.78, 0.65, 0.75),
    "pink": (0.92, 0.45, 0.98),
}
_BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "white": (236, 236, 232),
    "black": (22, 22, 24),
    "gray": (128, 128, 128),
    "beige": (214, 196, 160),
    "navy": (26, 34, 84),
}
# Centre of the main object as a fraction of the image side (x, y).
_POSITION_XY: dict[str, tuple[float, float]] = {
    "top left": (0.29, 0.29),
    "top right": (0.71, 0.29),
    "bottom left": (0.29, 0.71),
    "bottom right": (0.71, 0.71),
    "center": (0.5, 0.5),
}
# Radius of the main object as a fraction of the image side.
_SIZE_RADIUS: dict[str, float] = {"small": 0.13, "medium": 0.185, "large": 0.25}
_DISTRACTOR_RADIUS = 0.095
# Where the distractor goes: the corner diagonally opposite the main object, nearer the edge.
_DISTRACTOR_XY: dict[str, tuple[float, float]] = {
    "top left": (0.84, 0.84),
    "top right": (0.16, 0.84),
    "bottom left": (0.84, 0.16),
    "bottom right": (0.16, 0.16),
}

# Phrasings. Each phrase names exactly one value, so tests (and people) can read the attributes back.
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little"),
    "medium": ("medium", "medium-sized"),
    "large": ("large", "big"),
}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("top left", "upper left"),
    "top right": ("top right", "upper right"),
    "bottom left": ("bottom left", "lower left"),
    "bottom right": ("bottom right", "lower right"),
    "center": ("center", "middle"),
}
_POSITION_FRAMES = ("in the {p}", "at the {p}", "in the {p} of the image")
_BACKGROUND_FRAMES = ("on a {b} background", "against a {b} backdrop", "with a {b} background")
_DISTRACTOR_FRAMES = ("next to a tiny {d}", "with a tiny {d} nearby", "and a tiny {d}")
_SENTENCE_PREFIXES = ("{a}", "a photo of {a}", "an image of {a}", "there is {a}", "a picture of {a}")
_TERSE = ("{a}", "a photo of {a}", "{c}")
# Probability that a free-form caption leaves out an attribute (shape and colour are always named).
_OMIT = {"size": 0.2, "position": 0.2, "background": 0.25, "distractor": 0.4}

_SUPERSAMPLE = 4  # draw at 4x and downsample: antialiased edges for little cost


@dataclass(frozen=True)
class Attributes:
    """One sample's ground truth. The distractor fields are both None or both set."""

    shape: str
    color: str
    position: str
    size: str
    background: str
    distractor_shape: str | None = None
    distractor_color: str | None = None

    @property
    def classname(self) -> str:
        """The zero-shot class of the sample: its main object's colour and shape."""
        return f"{self.color} {self.shape}"

    @property
    def has_distractor(self) -> bool:
        return self.distractor_shape is not None


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _distractor(rng: np.random.Generator, shape: str, color: str) -> tuple[str | None, str | None]:
    if rng.random() >= DISTRACTOR_RATE:
        return None, None
    while True:  # never the main object's own class: that would make "a red circle and a tiny red circle"
        ds, dc = _pick(rng, SHAPES), _pick(rng, COLORS)
        if (ds, dc) != (shape, color):
            return ds, dc


def sample_attributes(
    rng: np.random.Generator, n: int, *, shape: str | None = None, color: str | None = None
) -> list[Attributes]:
    """n independent samples, every attribute uniform over its vocabulary, a distractor at DISTRACTOR_RATE.

    `shape` / `color` fix the main object (the zero-shot and probe splits draw per class).
    """
    if shape is not None and shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}")
    if color is not None and color not in COLORS:
        raise ValueError(f"unknown color {color!r}")
    fixed_shape, fixed_color = shape, color
    out = []
    for _ in range(n):
        shape = fixed_shape if fixed_shape is not None else _pick(rng, SHAPES)
        color = fixed_color if fixed_color is not None else _pick(rng, COLORS)
        position, size, background = _pick(rng, POSITIONS), _pick(rng, SIZES), _pick(rng, BACKGROUNDS)
        ds, dc = _distractor(rng, shape, color)
        out.append(Attributes(shape, color, position, size, background, ds, dc))
    return out


_UNIQUE_DIMS = (SHAPES, COLORS, POSITIONS, SIZES, BACKGROUNDS)


def unique_combinations() -> int:
    """How many samples `unique_attributes` can draw: the distinct (shape, color, position, size, background)."""
    return math.prod(len(d) for d in _UNIQUE_DIMS)


def unique_attributes(rng: np.random.Generator, n: int) -> list[Attributes]:
    """n samples with pairwise different (shape, color, position, size, background): unique `describe` captions."""
    dims = _UNIQUE_DIMS
    total = unique_combinations()
    if n > total:
        raise ValueError(f"only {total} distinct attribute combinations exist, asked for {n}")
    out = []
    for flat in rng.choice(total, size=n, replace=False):
        idx, values = int(flat), []
        for d in reversed(dims):
            idx, r = divmod(idx, len(d))
            values.append(d[r])
        shape, color, position, size, background = reversed(values)
        ds, dc = _distractor(rng, shape, color)
        out.append(Attributes(shape, color, position, size, background, ds, dc))
    return out


def _article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def describe(attrs: Attributes) -> str:
    """The canonical caption naming every attribute: deterministic, so distinct attributes give distinct text."""
    text = f"{_article(attrs.size)} {attrs.color} {attrs.shape} in the {attrs.position} on a {attrs.background} background"
    if attrs.has_distractor:
        text += f" next to a tiny {attrs.distractor_color} {attrs.distractor_shape}"
    return text


def caption(attrs: Attributes, rng: np.random.Generator) -> str:
    """A free-form caption: varied phrasing and order; shape and colour always named, others sometimes omitted."""
    size = None if rng.random() < _OMIT["size"] else _pick(rng, SIZE_WORDS[attrs.size])
    pos = None if rng.random() < _OMIT["position"] else _pick(rng, POSITION_PHRASES[attrs.position])
    bg = None if rng.random() < _OMIT["background"] else attrs.background
    dis = None
    if attrs.has_distractor and rng.random() >= _OMIT["distractor"]:
        dis = f"{attrs.distractor_color} {attrs.distractor_shape}"
    style = rng.random()
    if style < 0.1:
        # Terse alt-text ("a red circle"): the main source of identical captions for different images.
        return _pick(rng, _TERSE).format(a=_article(f"{attrs.color} {attrs.shape}"), c=f"{attrs.color} {attrs.shape}")
    if style < 0.35:
        # Tag-list style, like keyword alt-text: "navy background, red circle, top left, small".
        tags = [f"{attrs.color} {attrs.shape}"]
        tags += [t for t in (pos, size, f"{bg} background" if bg else None) if t]
        if dis:
            tags.append(f"tiny {dis}")
        order = rng.permutation(len(tags))
        return ", ".join(tags[int(i)] for i in order)
    noun = f"{size} {attrs.color} {attrs.shape}" if size else f"{attrs.color} {attrs.shape}"
    head = _pick(rng, _SENTENCE_PREFIXES).format(a=_article(noun))
    extras = []
    if pos:
        extras.append(_pick(rng, _POSITION_FRAMES).format(p=pos))
    if bg:
        extras.append(_pick(rng, _BACKGROUND_FRAMES).format(b=bg))
    if dis:
        extras.append(_pick(rng, _DISTRACTOR_FRAMES).format(d=dis))
    order = rng.permutation(len(extras))
    return " ".join([head, *(extras[int(i)] for i in order)])


def _object_rgb(color: str, rng: np.random.Generator) -> tuple[int, int, int]:
    h, s, v = _COLOR_HSV[color]
    h = (h + rng.uniform(-0.022, 0.022)) % 1.0
    s = float(np.clip(s * rng.uniform(0.8, 1.1), 0.0, 1.0))
    v = float(np.clip(v * rng.uniform(0.75, 1.05), 0.0, 1.0))
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a shape of circumradius-like size r (areas roughly comparable across shapes)."""
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
        scale = 0.95
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
        scale = 1.15
    elif shape == "hexagon":
        pts = [(math.cos(a), math.sin(a)) for a in (k * math.pi / 3 for k in range(6))]
        scale = 1.0
    elif shape == "star":
        pts = [
            ((1.0 if k % 2 == 0 else 0.45) * math.cos(a), (1.0 if k % 2 == 0 else 0.45) * math.sin(a))
            for k, a in enumerate(-math.pi / 2 + k * math.pi / 5 for k in range(10))
        ]
        scale = 1.2
    elif shape == "cross":
        w = 0.36  # half-width of each bar
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
        scale = 1.0
    else:
        raise ValueError(f"unknown shape {shape!r}")
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + scale * r * (x * ca - y * sa), cy + scale * r * (x * sa + y * ca)) for x, y in pts]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=fill)


def render(attrs: Attributes, rng: np.random.Generator, *, image_size: int = 32) -> Image.Image:
    """Draw the sample as an RGB image of image_size px, with jittered geometry and colour, noise and blur."""
    big = image_size * _SUPERSAMPLE
    base = np.clip(np.array(_BACKGROUND_RGB[attrs.background]) * rng.uniform(0.85, 1.12), 0, 255)
    img = Image.new("RGB", (big, big), tuple(int(c) for c in base))
    draw = ImageDraw.Draw(img)

    px, py = _POSITION_XY[attrs.position]
    cx = (px + rng.uniform(-0.06, 0.06)) * big
    cy = (py + rng.uniform(-0.06, 0.06)) * big
    r = _SIZE_RADIUS[attrs.size] * rng.uniform(0.9, 1.1) * big
    angle = math.radians(rng.uniform(-20, 20))
    _draw_shape(draw, attrs.shape, cx, cy, r, angle, _object_rgb(attrs.color, rng))

    if attrs.has_distractor:
        if attrs.position == "center":
            dx, dy = _DISTRACTOR_XY[_pick(rng, tuple(_DISTRACTOR_XY))]
        else:
            dx, dy = _DISTRACTOR_XY[attrs.position]
        dr = _DISTRACTOR_RADIUS * rng.uniform(0.9, 1.1) * big
        dangle = math.radians(rng.uniform(-20, 20))
        dcx, dcy = (dx + rng.uniform(-0.03, 0.03)) * big, (dy + rng.uniform(-0.03, 0.03)) * big
        _draw_shape(draw, attrs.distractor_shape, dcx, dcy, dr, dangle, _object_rgb(attrs.distractor_color, rng))

    img = img.resize((image_size, image_size), Image.Resampling.BOX)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.7))))
    # A soft linear light gradient over the whole scene, in a random direction, then sensor-like noise.
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32) / max(image_size - 1, 1) - 0.5
    shade = 1.0 + rng.uniform(0.0, 0.2) * (xx * math.cos(theta) + yy * math.sin(theta))
    noise = rng.normal(0.0, rng.uniform(2.0, 8.0), size=(image_size, image_size, 3))
    arr = np.clip(np.asarray(img, dtype=np.float32) * shade[..., None] + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


JPEG_QUALITY = 90


def encode_jpeg(img: Image.Image) -> bytes:
    """Fixed quality and no chroma subsampling: same pixels give the same bytes, and colour survives at 32 px."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False)
    return buf.getvalue()
