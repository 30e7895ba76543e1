"""What the patch fed the language model: per forward (`StsReport`, `handle.report`) and summed
over training forwards (`StsTotals`, `handle.totals`, what `StsCallback` logs)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class StsReport:
    """What the last forward fed the language model."""

    visual_tokens_in: int = 0  # visual tokens the projector produced
    visual_tokens_kept: int = 0  # visual tokens the LM received
    image_tokens_in: int = 0  # the same two counts for images only
    image_tokens_kept: int = 0
    video_tokens_in: int = 0  # and for videos only
    video_tokens_kept: int = 0
    lm_tokens_in: int = 0  # B * T of the batch as passed
    lm_tokens: int = 0  # B * T' the LM ran on (after placeholder removal)
    layer_fraction: float = 1.0  # skipper: rows run / rows a dense pass runs, over all layers
    rows_run: list[int] = field(default_factory=list)  # per layer, from the skipper
    rows_total: list[int] = field(default_factory=list)
    # [B, T'] column of the caller's batch each LM column came from (-1: re-padding); None when
    # the forward shrank nothing. Placeholders map to the last `kept` columns of their image so
    # that logits stay next to the text they predict.
    columns: Tensor | None = field(default=None, repr=False)

    @property
    def executed_fraction(self) -> float:
        """LM layer-FLOPs executed relative to the dense, unpatched forward of the same batch
        (layer cost taken as linear in tokens)."""
        tokens = self.lm_tokens / self.lm_tokens_in if self.lm_tokens_in else 1.0
        return tokens * self.layer_fraction


@dataclass
class StsTotals:
    """`StsReport`s summed over the training forwards since the last `reset()` (all
    micro-batches of a gradient-accumulation step alike); what `StsCallback` logs."""

    forwards: int = 0
    visual_tokens_in: int = 0
    visual_tokens_kept: int = 0
    lm_tokens_in: int = 0
    lm_tokens_executed: float = 0.0  # sum of lm_tokens_in * executed_fraction
    rows_run: int = 0  # decoder-layer rows run, over all layers
    rows_total: int = 0

    def add(self, report: StsReport) -> None:
        self.forwards += 1
        self.visual_tokens_in += report.visual_tokens_in
        self.visual_tokens_kept += report.visual_tokens_kept
        self.lm_tokens_in += report.lm_tokens_in
        self.lm_tokens_executed += report.lm_tokens_in * report.executed_fraction
        self.rows_run += sum(report.rows_run)
        self.rows_total += sum(report.rows_total)

    def merge(self, other: StsTotals) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def reset(self) -> None:
        self.__init__()

    @property
    def executed_fraction(self) -> float:
        """LM layer-FLOPs executed over these forwards relative to dense ones."""
        return self.lm_tokens_executed / self.lm_tokens_in if self.lm_tokens_in else 1.0
