"""The adapter registry: lookup, the TypeError for unsupported models, the README table."""

from __future__ import annotations

import pathlib
import re

import pytest
from torch import nn

from sts_kernels.integrations.hf.adapters import (  # noqa: E402
    ADAPTERS,
    REFUSED,
    adapter_for,
    generic,
    support_table,
)

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_readme_support_table_matches_the_registry():
    text = README.read_text()
    found = re.search(r"<!-- support-table:[^\n]*-->\n(.*?)<!-- /support-table -->", text, re.S)
    assert found, "README.md lost its support-table markers"
    assert found.group(1) == support_table(), (
        "README support table is stale: paste sts_kernels.integrations.hf.adapters.support_table()"
    )


def test_every_registered_class_has_a_row():
    table = support_table()
    assert all(f"`{name}`" in table for name in ADAPTERS)
    # plus the convention fallback's row and one per refused class
    assert table.count("\n") == 2 + len(set(ADAPTERS.values())) + 1 + len(REFUSED)
    assert all(f"`{name}`" in table and why in table for name, why in REFUSED.items())


def test_every_dash_says_why():
    """A "-" cell of a served family comes with the reason its last column shows."""
    for adapter in [*dict.fromkeys(ADAPTERS.values()), generic.ADAPTER]:
        if {"pool", "merge"} - set(adapter.modes):
            assert adapter.mode_reason, adapter.name
        if {"sample", "token"} - set(adapter.lds_modes):
            assert adapter.lds_reason, adapter.name
        if not adapter.packs:
            assert adapter.packs_reason, adapter.name
    for line in support_table().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert "-" not in cells[2:8] or cells[8], line


def test_a_refused_class_says_why():
    refused = type("Gemma3nForConditionalGeneration", (nn.Module,), {})
    with pytest.raises(TypeError, match="keys/values"):
        adapter_for(refused())


def test_unsupported_model_names_its_class_and_the_supported_ones():
    class TinyNet(nn.Module):
        pass

    with pytest.raises(TypeError, match="TinyNet") as info:
        adapter_for(TinyNet())
    assert all(name in str(info.value) for name in ADAPTERS)


def test_subclass_of_a_supported_model_uses_its_adapter():
    base = type("Qwen2VLForConditionalGeneration", (nn.Module,), {})
    sub = type("MyQwen", (base,), {})
    assert adapter_for(sub()) is ADAPTERS["Qwen2VLForConditionalGeneration"]
