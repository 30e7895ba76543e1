"""What the README's support table claims, checked for every registered class: each has a
tiny model here, and each VTC mode / LDS mode its row says "yes" to runs a sparser training
step on it (and each "-" is refused with a ValueError before any forward)."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from hf_models import CASES, check_train_step_is_sparser  # noqa: E402

from sts_kernels.integrations.hf import apply_sts  # noqa: E402
from sts_kernels.integrations.hf.adapters import ADAPTERS, adapter_for, generic  # noqa: E402
from sts_kernels.integrations.hf.adapters._base import takes_encoder_outputs  # noqa: E402


def test_every_registered_class_has_a_tiny_model():
    """Every registered class has a case; the other cases are classes the convention
    fallback serves (tests/hf/test_hf_group_b.py)."""
    assert set(ADAPTERS) <= set(CASES)
    for name in set(CASES) - set(ADAPTERS):
        assert adapter_for(CASES[name].make()) is generic.ADAPTER, name


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_claimed_modes_train_and_the_others_are_refused(name):
    adapter = ADAPTERS[name]
    case = CASES[name]
    model = case.make()
    batch = case.batch(model, True)
    vtc = {"mode": adapter.modes[0]} if adapter.modes else False
    if adapter.needs_encoder_outputs and not takes_encoder_outputs(model):  # transformers 5.1x
        with pytest.raises(ValueError, match="mm_encoder_outputs"):
            apply_sts(model, compress=True)
        vtc = False
    # tests/hf/test_hf_families.py covers pool + sample mode (and merge where a family
    # trains with it); here: the other claims
    if "merge" in adapter.modes and vtc:
        check_train_step_is_sparser(model, batch, compress={"mode": "merge"}, skip=False)
    else:
        with pytest.raises(ValueError, match="compress: "):
            apply_sts(model, compress={"mode": "merge"})
    if "token" in adapter.lds_modes:
        check_train_step_is_sparser(model, batch, compress=vtc, skip={"mode": "token", "seed": 0})
    else:
        with pytest.raises(ValueError, match="supports LDS mode"):
            apply_sts(model, skip={"mode": "token"})
