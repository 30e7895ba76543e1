"""A synthetic multimodal task for training a tiny LLaVA from scratch: no download, no tokenizer.

Each image is split into four quadrants; each quadrant holds one coloured shape (square, disc
or triangle; small or big; somewhere inside the quadrant) or stays empty. After the image come
`questions_per_image` question/answer groups, each three integer tokens and a one-token answer
(the loss and the accuracy see only the answers):

    [BOS] [IMG] * n_image_tokens  then per question one of
    [Q_COLOUR] [quadrant] [ANSWER] colour   colour of that quadrant's shape
    [Q_SIZE]   [quadrant] [ANSWER] size     small / big
    [Q_SHAPE]  [quadrant] [ANSWER] shape    square / disc / triangle
    [Q_COUNT]  [colour]   [ANSWER] count    how many shapes have that colour
    [Q_WHERE]  [colour]   [ANSWER] quadrant where the first shape of that colour is

Everything is a pure function of (seed, index), so the train and held-out splits (disjoint
index ranges) are reproducible on any device. Image size is a parameter: with patch size p the
vision tower produces (size / p)^2 tokens, which is what makes visual token compression matter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# vocabulary (plain ints)
PAD, BOS, IMAGE, ANSWER = 0, 1, 2, 3
Q_COLOUR, Q_SIZE, Q_COUNT, Q_SHAPE, Q_WHERE = 4, 5, 6, 7, 8
QUADRANTS = (10, 11, 12, 13)  # top-left, top-right, bottom-left, bottom-right
COLOURS = (20, 21, 22, 23)  # red, green, blue, yellow
SIZES = (30, 31)  # small, big
COUNTS = (40, 41, 42, 43, 44)  # 0..4
SHAPES = (50, 51, 52)  # square, disc, triangle
VOCAB_SIZE = 64
QUESTION_TYPES = ("colour", "size", "count", "shape", "where")

_RGB = torch.tensor([[0.9, 0.15, 0.1], [0.1, 0.8, 0.2], [0.15, 0.3, 0.95], [0.95, 0.85, 0.1]])
_TRAIN_OFFSET, _EVAL_OFFSET = 0, 1 << 30  # disjoint index ranges for the two splits


class Layout:
    """The sequence both tasks share: [BOS], one placeholder per image token ((image_size /
    patch_size)^2), then 4 tokens per question (`questions_per_image`)."""

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def seq_len(self) -> int:
        return 1 + self.image_tokens + 4 * self.questions_per_image


@dataclass(frozen=True)
class TaskConfig(Layout):
    image_size: int = 64  # pixels per side
    patch_size: int = 4  # the vision tower's patch: image tokens = (image_size / patch_size)^2
    questions: tuple[str, ...] = ("colour", "size")
    shapes: int = 1  # quadrants holding a shape (1..4); the others stay empty
    extents: tuple[float, float] = (0.3, 1.0)  # small / big shape side, fraction of a quadrant
    noise: float = 0.05  # pixel noise std
    questions_per_image: int = 4


@dataclass
class Batch:
    input_ids: Tensor  # [B, T] int64
    attention_mask: Tensor  # [B, T] int64 (all ones: every sequence has the same length)
    labels: Tensor  # [B, T] int64, -100 except on the answer tokens
    pixel_values: Tensor  # [B, 3, S, S] fp32 in [-1, 1]
    question_type: Tensor  # [B, Q] index into cfg.questions of each question

    def model_inputs(self) -> dict[str, Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "labels": self.labels,
            "pixel_values": self.pixel_values,
        }

    def to(self, device) -> Batch:
        return Batch(**{k: v.to(device) for k, v in self.__dict__.items()})


def _scene(gen: torch.Generator, cfg: TaskConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """One image [3, S, S] and its facts per quadrant (-1 where empty)."""
    s = cfg.image_size
    half = s // 2
    img = torch.full((3, s, s), 0.2) + cfg.noise * torch.randn(3, s, s, generator=gen)
    present = torch.zeros(4, dtype=torch.bool)
    present[torch.randperm(4, generator=gen)[: cfg.shapes]] = True
    colour = torch.randint(0, len(COLOURS), (4,), generator=gen)
    size = torch.randint(0, len(SIZES), (4,), generator=gen)
    shape = torch.randint(0, len(SHAPES), (4,), generator=gen)
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    for q in range(4):
        if not present[q]:
            continue
        extent = round(half * cfg.extents[int(size[q])])
        free = half - extent
        oy = (q // 2) * half + int(torch.randint(0, free + 1, (), generator=gen))
        ox = (q % 2) * half + int(torch.randint(0, free + 1, (), generator=gen))
        dy, dx = (yy - oy).float(), (xx - ox).float()
        inside = (dy >= 0) & (dy < extent) & (dx >= 0) & (dx < extent)
        if shape[q] == 1:  # disc
            r = extent / 2
            inside &= (dy - r + 0.5) ** 2 + (dx - r + 0.5) ** 2 <= r * r
        elif shape[q] == 2:  # triangle, apex up
            inside &= (dx - extent / 2).abs() <= dy / 2
        rgb = _RGB[colour[q]] + 0.05 * torch.randn(3, generator=gen)
        img = torch.where(inside[None], rgb[:, None, None], img)
    facts = {
        "present": present,
        "colour": torch.where(present, colour, -1),
        "size": torch.where(present, size, -1),
        "shape": torch.where(present, shape, -1),
    }
    return (img.clamp(0, 1) * 2 - 1), facts


def _question(gen: torch.Generator, cfg: TaskConfig, facts: dict[str, Tensor]):
    """(question type index, [type token, argument token], answer token)."""
    kind = int(torch.randint(0, len(cfg.questions), (), generator=gen))
    name = cfg.questions[kind]
    if name == "count":
        c = int(torch.randint(0, len(COLOURS), (), generator=gen))
        n = int((facts["colour"] == c).sum())
        return kind, [Q_COUNT, COLOURS[c]], COUNTS[n]
    filled = facts["present"].nonzero().squeeze(1)
    q = int(filled[int(torch.randint(0, filled.numel(), (), generator=gen))])
    if name == "where":
        c = facts["colour"][q]
        first = int((facts["colour"] == c).nonzero()[0])
        return kind, [Q_WHERE, COLOURS[int(c)]], QUADRANTS[first]
    token, table = {
        "colour": (Q_COLOUR, COLOURS),
        "size": (Q_SIZE, SIZES),
        "shape": (Q_SHAPE, SHAPES),
    }[name]
    return kind, [token, QUADRANTS[q]], table[int(facts[name][q])]


def sample(cfg: TaskConfig, seed: int, index: int) -> tuple[Tensor, list[int], list[int]]:
    """Sample `index` of the stream `seed`: (image, token ids, question types)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    img, facts = _scene(gen, cfg)
    ids, kinds = [BOS] + [IMAGE] * cfg.image_tokens, []
    for _ in range(cfg.questions_per_image):
        kind, question, answer = _question(gen, cfg, facts)
        ids += question + [ANSWER, answer]
        kinds.append(kind)
    return img, ids, kinds


def make_batch(cfg: TaskConfig, seed: int, indices: list[int], split: str = "train") -> Batch:
    """Collate samples; `split` "eval" draws from an index range disjoint from "train"."""
    return collate(cfg, [sample(cfg, seed, offset(split) + i) for i in indices])


def offset(split: str) -> int:
    """First sample index of a split: "eval" is disjoint from "train"."""
    return _EVAL_OFFSET if split == "eval" else _TRAIN_OFFSET


def collate(cfg: Layout, samples: list[tuple[Tensor, list[int], list[int]]]) -> Batch:
    """(image, ids, question types) samples -> Batch; labels only on the answers."""
    imgs, ids, kinds = zip(*samples)
    input_ids = torch.tensor(ids)  # [B, T]
    labels = torch.full_like(input_ids, -100)
    answers = input_ids.shape[1] - 1 - 4 * torch.arange(cfg.questions_per_image)  # positions
    labels[:, answers] = input_ids[:, answers]  # the loss sees only the answers
    return Batch(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        labels=labels,
        pixel_values=torch.stack(imgs),
        question_type=torch.tensor(kinds),
    )


def answer_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """[B, Q] bool: each answer token is the arg-max at the position that predicts it, in
    sequence order. `labels` are the ones the model ran on (shrunk ones under VTC)."""
    target = labels[:, 1:].to(logits.device)
    hit = logits[:, :-1].argmax(-1) == target
    b = labels.shape[0]
    return hit[target != -100].view(b, -1)
