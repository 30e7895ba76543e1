"""The checks every family passes, run for every registered class of `hf_models.CASES`: eval
logits with the patch equal the unpatched model's, a train step with VTC and LDS is sparser
(and shows the case's report counts), and remove() restores the model exactly. The families'
own files (tests/hf/test_hf_<family>.py) check what is particular to their layout."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from hf_models import (  # noqa: E402
    CASES,
    check_eval_equals_unpatched,
    check_remove_restores,
    check_train_step_is_sparser,
    needs_encoder_outputs,
)


def _marks(case) -> list:
    return [needs_encoder_outputs] if case.needs_encoder_outputs else []


TRAIN = [
    pytest.param(name, train, id=f"{name}-{train.id}", marks=_marks(case))
    for name, case in CASES.items()
    for train in case.train
]
EVAL = [pytest.param(name, id=name, marks=_marks(case)) for name, case in CASES.items()]


@pytest.mark.parametrize(("name", "train"), TRAIN)
def test_train_step_is_sparser(name, train):
    case = CASES[name]
    model = case.make()
    report = check_train_step_is_sparser(model, case.batch(model, train.pad_left), **train.kwargs)
    assert {key: getattr(report, key) for key in train.report} == train.report, report


@pytest.mark.parametrize("name", EVAL)
def test_eval_equals_unpatched_and_remove_restores(name):
    case = CASES[name]
    model = case.make()
    batch = case.batch(model, case.eval_pad_left)
    check_eval_equals_unpatched(model, batch)
    check_remove_restores(model, batch)
