"""Arrow-pointing images (pLSTM's 2D extrapolation task): does the arrow point at the disk?

Each image (``size`` x ``size``) shows a filled disk and an arrow (a shaft and a two-stroke
head). The label is True when the ray that starts at the arrow's head and continues in its
direction meets the disk. Half the images are positive. Geometry is scaled from the pLSTM
generator (192 px: disk radius 15-30 px, arrow length 10-30 px) to ``size``, with a floor so
small images stay legible; the arrow never touches the disk.

:func:`arrow_images` gives float images (n, size, size) with 0 background, 0.5 disk, 1 arrow,
for 2D models. :class:`ArrowPointingTask` is the same data as a token sequence (pixels row by
row: 0 background, 1 disk, 2 arrow, then an ANS token; the answer is YES/NO), so any causal
sequence model can be trained on it; ``length`` is the image side.
"""

from __future__ import annotations

import math

import numpy as np

from .sequence_task import SequenceTask, TaskBatch, make_batch


def ray_hits_disk(head, direction, center, radius) -> bool:
    """Closed form: does the ray head + s*direction (s >= 0) come within ``radius`` of center?"""
    d = np.asarray(direction, float) / np.linalg.norm(direction)
    w = np.asarray(center, float) - np.asarray(head, float)
    s = max(0.0, float(w @ d))
    closest = np.asarray(head, float) + s * d
    return bool(np.linalg.norm(closest - np.asarray(center, float)) <= radius)


def _draw_segment(img, a, b, value):
    steps = int(math.ceil(4 * max(abs(b[0] - a[0]), abs(b[1] - a[1])))) + 1
    for s in np.linspace(0.0, 1.0, steps):
        x, y = a[0] + s * (b[0] - a[0]), a[1] + s * (b[1] - a[1])
        i, j = int(round(y)), int(round(x))
        if 0 <= i < img.shape[0] and 0 <= j < img.shape[1]:
            img[i, j] = value


def arrow_images(n: int, size: int, rng: np.random.Generator):
    """``images`` (n, size, size) float32, ``labels`` (n,) bool, and the geometry (dict)."""
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    scale = size / 192
    images = np.zeros((n, size, size), dtype=np.float32)
    labels = rng.integers(0, 2, size=n).astype(bool)
    geometry = {"center": np.zeros((n, 2)), "radius": np.zeros(n), "tail": np.zeros((n, 2)),
                "head": np.zeros((n, 2))}
    yy, xx = np.mgrid[0:size, 0:size]
    for b in range(n):
        while True:
            radius = max(1.5, rng.uniform(15, 30) * scale)
            length = max(5.0, rng.uniform(10, 30) * scale)
            center = rng.uniform(radius, size - 1 - radius, size=2)
            tail = rng.uniform(0, size - 1, size=2)
            if labels[b]:  # aim at a random point inside the disk
                r, phi = radius * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
                target = center + r * np.array([math.cos(phi), math.sin(phi)])
                direction = target - tail
            else:
                phi = rng.uniform(0, 2 * math.pi)
                direction = np.array([math.cos(phi), math.sin(phi)])
            norm = np.linalg.norm(direction)
            if norm < 1e-6:
                continue
            direction = direction / norm
            head = tail + length * direction
            if not (0 <= head[0] <= size - 1 and 0 <= head[1] <= size - 1):
                continue
            # keep the whole arrow (and its head strokes) clear of the disk
            clear = radius + 1.5
            pts = tail[None] + np.linspace(0, 1, 20)[:, None] * (head - tail)[None]
            if (np.linalg.norm(pts - center, axis=1) <= clear).any():
                continue
            if ray_hits_disk(head, direction, center, radius) != labels[b]:
                continue
            break
        img = images[b]
        img[(xx - center[0]) ** 2 + (yy - center[1]) ** 2 <= radius ** 2] = 0.5
        _draw_segment(img, tail, head, 1.0)
        barb = max(1.5, 0.35 * length)
        for angle in (2.5, -2.5):  # about 143 degrees back from the direction
            c, s = math.cos(angle), math.sin(angle)
            back = np.array([c * direction[0] - s * direction[1],
                             s * direction[0] + c * direction[1]])
            _draw_segment(img, head, head + barb * back, 1.0)
        geometry["center"][b], geometry["radius"][b] = center, radius
        geometry["tail"][b], geometry["head"][b] = tail, head
    return images, labels, geometry


class ArrowPointingTask(SequenceTask):
    name = "arrows"
    description = "does the arrow point at the disk? (image pixels as a token sequence)"
    length_meaning = "image side in pixels"
    primary_metric = "sequence"
    default_train_length = 16
    default_test_lengths = (16, 24, 32)
    min_length = 8
    ans, no, yes = 3, 4, 5
    vocab_size = 6

    def sequence_length(self, length: int) -> int:
        return length * length + 1

    def _generate(self, n: int, length: int, rng: np.random.Generator) -> TaskBatch:
        images, labels, geometry = arrow_images(n, length, rng)
        pixels = np.rint(images * 2).astype(np.int64).reshape(n, -1)
        inputs = np.concatenate([pixels, np.full((n, 1), self.ans)], axis=1)
        targets = np.zeros_like(inputs)
        targets[:, -1] = np.where(labels, self.yes, self.no)
        mask = np.zeros(inputs.shape, dtype=bool)
        mask[:, -1] = True
        return make_batch(inputs, targets, mask, self.vocab_size, labels=labels, **geometry)
