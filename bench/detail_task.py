"""A detail-sensitive synthetic task (`--task detail`): answers that depend on structure a 2x2
or 3x3 pool of the visual tokens can blur. Same layout and vocabulary size as bench/task.py
(one-token answers after [ANSWER], the loss sees only the answers), a pure function of
(seed, index).

Each image is one of four scene kinds (index mod 4 picks it, so every batch of 4 or more holds
all kinds); its `questions_per_image` questions are all about that scene:

    digits  a 4-digit string in a 3x5 pixel font (each font pixel `font_scale` pixels) at a
            random place:            [Q_DIGIT] [position 0..3]  -> digit 0..9
    count   up to 4 dots (3x3 px) of each of 4 colours, scattered, never touching:
                                     [Q_COUNT] [colour]         -> count 0..4
    cell    4 items (3x3 px) of 4 colours in 4 distinct cells of a 4x4 grid:
                                     [Q_CELL]  [colour]         -> cell 0..15
    pair    one anchor dot per quadrant (its colour names it) and a white partner dot 1-2 px
            beside it:               [Q_PAIR]  [colour]         -> left / right / above / below

With 4 px patches a pooled 2x2 token covers 8x8 px: a digit, or an anchor with its partner,
falls within one or two pooled tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .task import ANSWER, BOS, IMAGE, VOCAB_SIZE, Batch, Layout, answer_accuracy, collate, offset

Q_DIGIT, Q_COUNT, Q_CELL, Q_PAIR = 4, 5, 6, 7
DIGITS = tuple(range(10, 20))  # 0..9
POSITIONS = tuple(range(20, 24))  # digit position 0..3
CELLS = tuple(range(24, 40))  # cell 0..15, row-major
COUNTS = tuple(range(40, 45))  # 0..4
COLOURS = tuple(range(45, 49))  # red, green, blue, yellow
DIRECTIONS = tuple(range(49, 53))  # partner left / right / above / below the anchor
SCENES = ("digits", "count", "cell", "pair")
assert max(DIRECTIONS) < 60 <= VOCAB_SIZE  # 60..62: the Qwen variant's vision tokens

_RGB = torch.tensor([[0.9, 0.15, 0.1], [0.1, 0.8, 0.2], [0.15, 0.3, 0.95], [0.95, 0.85, 0.1]])
_WHITE = torch.tensor([0.95, 0.95, 0.95])
_FONT = (  # 3x5, rows top to bottom, 3 bits each (left = 4)
    (7, 5, 5, 5, 7),
    (2, 6, 2, 2, 7),
    (7, 1, 7, 4, 7),
    (7, 1, 7, 1, 7),
    (5, 5, 7, 1, 1),
    (7, 4, 7, 1, 7),
    (7, 4, 7, 5, 7),
    (7, 1, 2, 2, 2),
    (7, 5, 7, 5, 7),
    (7, 5, 7, 1, 7),
)
DOT = 3  # side of a dot, pixels


@dataclass(frozen=True)
class DetailConfig(Layout):
    image_size: int = 64  # pixels per side (>= 32)
    patch_size: int = 4
    noise: float = 0.05
    font_scale: int = 2  # a digit is 3 x 5 font pixels of font_scale x font_scale px
    questions_per_image: int = 4  # at most 4
    questions: tuple[str, ...] = SCENES  # question types (= scene kinds), in index order

    def __post_init__(self):
        if self.image_size < 32 or self.image_size < 15 * self.font_scale + 2:
            raise ValueError(
                f"the detail task needs images of 32 px or more, got {self.image_size}"
            )


def _rand(gen: torch.Generator, high: int) -> int:
    """Uniform int in [0, high)."""
    return int(torch.randint(0, high, (), generator=gen))


def _paint(img: Tensor, y: int, x: int, h: int, w: int, rgb: Tensor) -> None:
    img[:, y : y + h, x : x + w] = rgb[:, None, None]


def _digits(gen, cfg, img):
    s, k = cfg.image_size, cfg.font_scale
    digits = torch.randint(0, 10, (4,), generator=gen).tolist()
    width = 4 * 3 * k + 3 * k  # digits 3k wide, k apart
    oy, ox = _rand(gen, s - 5 * k + 1), _rand(gen, s - width + 1)
    for i, d in enumerate(digits):
        for row, bits in enumerate(_FONT[d]):
            for col in range(3):
                if bits >> (2 - col) & 1:
                    _paint(img, oy + row * k, ox + i * 4 * k + col * k, k, k, _WHITE)
    order = torch.randperm(4, generator=gen).tolist()
    return [([Q_DIGIT, POSITIONS[i]], DIGITS[digits[i]]) for i in order]


def _free_spots(gen, cfg, n: int) -> list[tuple[int, int]]:
    """`n` dot positions on a lattice of 5 px steps (1+ px between dots), without repeats."""
    steps = (cfg.image_size - DOT) // 5 + 1
    picks = torch.randperm(steps * steps, generator=gen)[:n].tolist()
    return [(5 * (p // steps), 5 * (p % steps)) for p in picks]


def _count(gen, cfg, img):
    counts = torch.randint(0, 5, (4,), generator=gen).tolist()
    spots = iter(_free_spots(gen, cfg, sum(counts)))
    for c, n in enumerate(counts):
        for _ in range(n):
            y, x = next(spots)
            _paint(img, y, x, DOT, DOT, _RGB[c])
    order = torch.randperm(4, generator=gen).tolist()
    return [([Q_COUNT, COLOURS[c]], COUNTS[counts[c]]) for c in order]


def _cell(gen, cfg, img):
    side = cfg.image_size // 4
    cells = torch.randperm(16, generator=gen)[:4].tolist()
    for c, cell in enumerate(cells):
        y = (cell // 4) * side + _rand(gen, side - DOT + 1)
        x = (cell % 4) * side + _rand(gen, side - DOT + 1)
        _paint(img, y, x, DOT, DOT, _RGB[c])
    order = torch.randperm(4, generator=gen).tolist()
    return [([Q_CELL, COLOURS[c]], CELLS[cells[c]]) for c in order]


def _pair(gen, cfg, img):
    half = cfg.image_size // 2
    colours = torch.randperm(4, generator=gen).tolist()  # colour of each quadrant's anchor
    out = []
    for q, c in enumerate(colours):
        direction = _rand(gen, 4)
        gap = 1 + _rand(gen, 2)
        step = DOT + gap
        dy, dx = ((0, -step), (0, step), (-step, 0), (step, 0))[direction]
        # anchor with room for the partner on every side, inside the quadrant
        lo, hi = step, half - DOT - step
        y = (q // 2) * half + lo + _rand(gen, hi - lo + 1)
        x = (q % 2) * half + lo + _rand(gen, hi - lo + 1)
        _paint(img, y, x, DOT, DOT, _RGB[c])
        _paint(img, y + dy, x + dx, DOT, DOT, _WHITE)
        out.append(([Q_PAIR, COLOURS[c]], DIRECTIONS[direction]))
    order = torch.randperm(4, generator=gen).tolist()
    return [out[i] for i in order]


_SCENE = {"digits": _digits, "count": _count, "cell": _cell, "pair": _pair}


def sample(cfg: DetailConfig, seed: int, index: int) -> tuple[Tensor, list[int], list[int]]:
    """Sample `index` of the stream `seed`: (image [3, S, S] in [-1, 1], ids, question types)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    kind = index % len(cfg.questions)
    s = cfg.image_size
    img = torch.full((3, s, s), 0.2) + cfg.noise * torch.randn(3, s, s, generator=gen)
    qa = _SCENE[cfg.questions[kind]](gen, cfg, img)[: cfg.questions_per_image]
    ids = [BOS] + [IMAGE] * cfg.image_tokens
    for question, answer in qa:
        ids += question + [ANSWER, answer]
    return img.clamp(0, 1) * 2 - 1, ids, [kind] * len(qa)


def make_batch(cfg: DetailConfig, seed: int, indices: list[int], split: str = "train") -> Batch:
    """Collate samples; `split` "eval" draws from an index range disjoint from "train"."""
    return collate(cfg, [sample(cfg, seed, offset(split) + i) for i in indices])


__all__ = ["DetailConfig", "SCENES", "answer_accuracy", "make_batch", "sample"]
