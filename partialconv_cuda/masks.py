"""Irregular hole masks like those inpainting papers train and test on: random brush strokes and
blobs, seeded, with an exact hole ratio."""
import math

import torch


def irregular_masks(batch, height, width, hole_ratio, seed=0, *, dtype=torch.float32, device=None):
    """Returns a (batch, 1, height, width) mask, 1 = valid and 0 = hole.

    The holes of each image are thick brush strokes (random walks of round-capped line segments)
    and ellipses, drawn until exactly round(hole_ratio * height * width) pixels are holes (the last
    shape is thinned to hit the count). The same seed gives the same masks on every machine, and
    image i does not depend on the batch size. hole_ratio must be in [0, 1).
    """
    if not 0.0 <= hole_ratio < 1.0:
        raise ValueError(f"irregular_masks: expected hole_ratio in [0, 1), got {hole_ratio}")
    if batch < 1 or height < 1 or width < 1:
        raise ValueError(f"irregular_masks: expected positive sizes, got {(batch, height, width)}")
    generator = torch.Generator().manual_seed(seed)
    hole_count = round(hole_ratio * height * width)
    holes = torch.stack([_draw_holes(height, width, hole_count, generator) for _ in range(batch)])
    return (~holes).unsqueeze(1).to(dtype=dtype, device=device)


def _draw_holes(height, width, hole_count, generator):
    holes = torch.zeros(height, width, dtype=torch.bool)
    covered = 0
    while covered < hole_count:
        shape = _stroke if _uniform(generator, 0, 1) < 0.75 else _blob
        for rows, cols, distance in shape(height, width, generator):
            # distance <= 1 inside the shape; pixels that are holes already do not count.
            free = torch.where(holes[rows, cols], math.inf, distance)
            new = free <= 1
            missing = hole_count - covered
            if int(new.sum()) > missing:
                # Thin the shape: keep the free pixels closest to its core.
                new = torch.zeros(free.numel(), dtype=torch.bool)
                new[free.flatten().topk(missing, largest=False).indices] = True
                new = new.view(free.shape)
            holes[rows, cols] |= new
            covered += int(new.sum())
            if covered == hole_count:
                break
    return holes


def _uniform(generator, low, high):
    return low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64).item()


def _box(height, width, y_low, y_high, x_low, x_high):
    """Pixel slices covering [y_low, y_high] x [x_low, x_high] and the pixel coordinates in them."""
    rows = slice(max(0, math.floor(y_low)), min(height, math.ceil(y_high) + 1))
    cols = slice(max(0, math.floor(x_low)), min(width, math.ceil(x_high) + 1))
    ys = torch.arange(rows.start, rows.stop, dtype=torch.float64).view(-1, 1)
    xs = torch.arange(cols.start, cols.stop, dtype=torch.float64).view(1, -1)
    return rows, cols, ys, xs


def _stroke(height, width, generator):
    """Yields the segments of one brush stroke as (rows, cols, distance / brush radius)."""
    size = min(height, width)
    radius = max(0.75, _uniform(generator, size / 64, size / 24))
    y, x = _uniform(generator, 0, height - 1), _uniform(generator, 0, width - 1)
    angle = _uniform(generator, 0, 2 * math.pi)
    for _ in range(int(_uniform(generator, 3, 11))):
        angle += _uniform(generator, -math.pi / 3, math.pi / 3)
        length = _uniform(generator, size / 16, size / 6)
        y_end, x_end = y + length * math.sin(angle), x + length * math.cos(angle)
        if not (0 <= y_end < height and 0 <= x_end < width):
            angle += math.pi  # turn back from the border rather than run along it
        y_end = min(max(y + length * math.sin(angle), 0), height - 1)
        x_end = min(max(x + length * math.cos(angle), 0), width - 1)
        rows, cols, ys, xs = _box(height, width, min(y, y_end) - radius, max(y, y_end) + radius,
                                  min(x, x_end) - radius, max(x, x_end) + radius)
        dy, dx = y_end - y, x_end - x
        # Distance to the segment: project onto it, clamped to its ends.
        t = ((ys - y) * dy + (xs - x) * dx) / max(dy * dy + dx * dx, 1e-12)
        t = t.clamp(0, 1)
        distance = torch.hypot(ys - (y + t * dy), xs - (x + t * dx))
        yield rows, cols, distance / radius
        y, x = y_end, x_end


def _blob(height, width, generator):
    """Yields one ellipse as (rows, cols, elliptic radius)."""
    size = min(height, width)
    semi_axes = [max(1.0, _uniform(generator, size / 32, size / 10)) for _ in range(2)]
    y, x = _uniform(generator, 0, height - 1), _uniform(generator, 0, width - 1)
    angle = _uniform(generator, 0, math.pi)
    reach = max(semi_axes)
    rows, cols, ys, xs = _box(height, width, y - reach, y + reach, x - reach, x + reach)
    along = (xs - x) * math.cos(angle) + (ys - y) * math.sin(angle)
    across = (ys - y) * math.cos(angle) - (xs - x) * math.sin(angle)
    yield rows, cols, torch.hypot(along / semi_axes[0], across / semi_axes[1])
