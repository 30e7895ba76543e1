"""The synthetic multimodal task of bench/task.py."""

import pytest
import torch

from bench import task as T


@pytest.fixture
def cfg():
    return T.TaskConfig(image_size=32, questions=T.QUESTION_TYPES, shapes=2, questions_per_image=3)


def test_batches_are_deterministic_and_splits_differ(cfg):
    a = T.make_batch(cfg, seed=0, indices=[0, 1, 2])
    b = T.make_batch(cfg, seed=0, indices=[0, 1, 2])
    for name in ("input_ids", "labels", "pixel_values", "question_type"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    held_out = T.make_batch(cfg, seed=0, indices=[0, 1, 2], split="eval")
    assert not torch.equal(a.pixel_values, held_out.pixel_values)
    other_seed = T.make_batch(cfg, seed=1, indices=[0, 1, 2])
    assert not torch.equal(a.pixel_values, other_seed.pixel_values)


def test_layout_labels_and_vocabulary(cfg):
    batch = T.make_batch(cfg, seed=3, indices=list(range(8)))
    b, length = batch.input_ids.shape
    assert length == cfg.seq_len == 1 + 64 + 4 * 3
    assert batch.pixel_values.shape == (b, 3, 32, 32)
    assert batch.pixel_values.min() >= -1 and batch.pixel_values.max() <= 1
    assert (batch.input_ids[:, 0] == T.BOS).all()
    assert ((batch.input_ids == T.IMAGE).sum(1) == cfg.image_tokens).all()
    answers = batch.labels != -100
    assert (answers.sum(1) == 3).all()
    assert torch.equal(batch.labels[answers], batch.input_ids[answers])
    # every answer follows an ANSWER token and lies in its question's answer set
    prev = torch.roll(batch.input_ids, 1, dims=1)
    assert (prev[answers] == T.ANSWER).all()
    answer_sets = {
        "colour": T.COLOURS,
        "size": T.SIZES,
        "count": T.COUNTS,
        "shape": T.SHAPES,
        "where": T.QUADRANTS,
    }
    for tokens, kinds in zip(batch.labels[answers].view(b, 3), batch.question_type):
        for token, kind in zip(tokens.tolist(), kinds.tolist()):
            assert token in answer_sets[cfg.questions[kind]]
    assert batch.input_ids.max() < T.VOCAB_SIZE


def test_answers_match_the_picture():
    cfg = T.TaskConfig(image_size=32, questions=("colour",), shapes=1, noise=0.0)
    img, ids, _ = T.sample(cfg, seed=0, index=5)
    colour = T.COLOURS.index(ids[-1])
    rgb = T._RGB[colour]
    # some pixel holds the answer's colour (up to the per-shape jitter), the background is grey
    close = ((img.permute(1, 2, 0) + 1) / 2 - rgb).abs().amax(-1) < 0.2
    assert close.any()


def test_answer_accuracy_counts_each_answer():
    cfg = T.TaskConfig(image_size=16, questions=("colour", "size"), questions_per_image=2)
    batch = T.make_batch(cfg, seed=0, indices=[0, 1])
    logits = torch.zeros(*batch.input_ids.shape, T.VOCAB_SIZE)
    target = batch.labels[:, 1:]
    logits[:, :-1].scatter_(-1, target.clamp_min(0)[..., None], 1.0)  # perfect predictions
    assert T.answer_accuracy(logits, batch.labels).all()
    logits[0, -2] = 0
    logits[0, -2, 0] = 1.0  # the last answer of sample 0 is wrong
    acc = T.answer_accuracy(logits, batch.labels)
    assert acc.shape == (2, 2) and acc.sum() == 3 and not acc[0, -1]
