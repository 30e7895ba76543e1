"""The detail-sensitive task of bench/detail_task.py."""

import torch

from bench import detail_task as D


def test_deterministic_splits_and_layout():
    cfg = D.DetailConfig(image_size=32)
    a = D.make_batch(cfg, 0, list(range(8)))
    b = D.make_batch(cfg, 0, list(range(8)))
    for name in ("input_ids", "labels", "pixel_values", "question_type"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(
        a.pixel_values, D.make_batch(cfg, 0, list(range(8)), "eval").pixel_values
    )
    assert not torch.equal(a.pixel_values, D.make_batch(cfg, 1, list(range(8))).pixel_values)
    assert a.input_ids.shape == (8, cfg.seq_len) and a.input_ids.max() < D.VOCAB_SIZE
    assert a.question_type[:, 0].tolist() == [0, 1, 2, 3] * 2  # index mod 4 picks the scene
    answers = a.labels != -100
    assert (answers.sum(1) == cfg.questions_per_image).all()
    sets = {"digits": D.DIGITS, "count": D.COUNTS, "cell": D.CELLS, "pair": D.DIRECTIONS}
    for tokens, kinds in zip(a.labels[answers].view(8, -1), a.question_type):
        for token, kind in zip(tokens.tolist(), kinds.tolist()):
            assert token in sets[cfg.questions[kind]]


def _pixels(img):
    return ((img + 1) / 2).permute(1, 2, 0)  # [S, S, 3] in [0, 1]


def test_answers_match_the_picture():
    cfg = D.DetailConfig(image_size=32, noise=0.0)
    # digits: the font's pixels of the asked digit are white at its place
    img, ids, _ = D.sample(cfg, 0, 0)
    white = (_pixels(img) > 0.9).all(-1)
    lit = white.nonzero()
    oy, ox = lit.min(0).values.tolist()
    k = cfg.font_scale
    for q in range(4):
        pos, digit = D.POSITIONS.index(ids[-16 + 4 * q + 1]), D.DIGITS.index(ids[-16 + 4 * q + 3])
        glyph = white[oy : oy + 5 * k : k, ox + 4 * k * pos : ox + 4 * k * pos + 3 * k : k]
        bits = [int("".join(str(int(v)) for v in row), 2) for row in glyph.tolist()]
        assert bits == list(D._FONT[digit])  # every glyph lights its top row and left column
    # count: the dots of the asked colour
    img, ids, _ = D.sample(cfg, 0, 1)
    for q in range(4):
        colour = D.COLOURS.index(ids[-16 + 4 * q + 1])
        count = D.COUNTS.index(ids[-16 + 4 * q + 3])
        close = ((_pixels(img) - D._RGB[colour]).abs().amax(-1) < 0.05).sum()
        assert int(close) == count * D.DOT * D.DOT
    # cell: the asked colour's dot lies in the answered cell
    img, ids, _ = D.sample(cfg, 0, 2)
    side = cfg.image_size // 4
    for q in range(4):
        colour = D.COLOURS.index(ids[-16 + 4 * q + 1])
        cell = D.CELLS.index(ids[-16 + 4 * q + 3])
        ys, xs = ((_pixels(img) - D._RGB[colour]).abs().amax(-1) < 0.05).nonzero(as_tuple=True)
        assert {int(y) // side * 4 + int(x) // side for y, x in zip(ys, xs)} == {cell}
    # pair: the white partner sits on the answered side of the anchor
    img, ids, _ = D.sample(cfg, 0, 3)
    white = (_pixels(img) > 0.9).all(-1)
    for q in range(4):
        colour = D.COLOURS.index(ids[-16 + 4 * q + 1])
        direction = D.DIRECTIONS.index(ids[-16 + 4 * q + 3])
        ys, xs = ((_pixels(img) - D._RGB[colour]).abs().amax(-1) < 0.05).nonzero(as_tuple=True)
        y, x = int(ys.min()), int(xs.min())
        dy, dx = ((0, -1), (0, 1), (-1, 0), (1, 0))[direction]
        assert any(  # the partner's corner, DOT + gap (1 or 2) pixels away on that side
            white[y + dy * (D.DOT + gap), x + dx * (D.DOT + gap)] for gap in (1, 2)
        )
