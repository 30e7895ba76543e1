"""`StsCallback`: what STS did during `transformers.Trainer` training, in the Trainer's logs.

    handle = apply_sts(model, stage="align")
    trainer = Trainer(model, args, ..., callbacks=[StsCallback(switch_step=1000)])

At every logging step the callback adds to the logs (so to TensorBoard / W&B / the console):

    sts/lm_flop_fraction      LM layer-FLOPs executed / those of the dense forwards
    sts/visual_tokens_in      visual tokens the projector produced
    sts/visual_tokens_kept    visual tokens the language model received
    sts/layer_rows_run        decoder-layer rows (samples or tokens) that ran, all layers
    sts/layer_rows_total      the rows dense layers would have run
    sts/stage                 0: the patch as applied, 1: after the switch

summed over every training forward since the previous log (all micro-batches of gradient
accumulation; the handle counts them in `handle.totals`). It writes into the `logs` dict of
`on_log`, so it must run before the reporting callbacks: `Trainer(callbacks=[...])` puts user
callbacks after them, hence `StsCallback.install(trainer)`, which puts it first.

`switch_step`: at the start of that optimizer step the patch is re-applied with `switch_to`
(`apply_sts` arguments; default `{"stage": "instruct"}`, i.e. VTC off, LDS on). The new patch
must add no parameters (a router skipper would be missed by the optimizer the Trainer built):
apply a router skipper from the start instead.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from .patch import apply_sts, sts_handle
from .report import StsTotals

__all__ = ["StsCallback"]


class StsCallback(TrainerCallback):
    def __init__(
        self, switch_step: int | None = None, switch_to: dict[str, Any] | None = None
    ) -> None:
        if switch_step is not None and (not isinstance(switch_step, int) or switch_step < 0):
            raise ValueError(f"switch_step must be None or an int >= 0, got {switch_step!r}")
        self.switch_step = switch_step
        self.switch_to = {"stage": "instruct"} if switch_to is None else dict(switch_to)
        self.stage = 0
        self._before_switch = StsTotals()  # the replaced handle's totals not yet logged

    @classmethod
    def install(cls, trainer, **kwargs) -> StsCallback:
        """A new callback placed first in `trainer`'s callbacks (before the reporters)."""
        callback = cls(**kwargs)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.stage or self.switch_step is None or state.global_step < self.switch_step:
            return
        handle = _live_handle(model)
        self._before_switch.merge(handle.totals)
        handle.remove()
        new = apply_sts(handle.model, **self.switch_to)
        if new.adds_parameters:
            new.remove()
            raise ValueError(
                f"StsCallback: switch_to={self.switch_to} adds parameters "
                f"({', '.join(new.adds_parameters)}) the Trainer's optimizer would not update; "
                "apply a router skipper before building the Trainer"
            )
        self.stage = 1

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        handle = sts_handle(model) if model is not None else None
        if logs is None or handle is None:
            return
        totals = StsTotals()
        totals.merge(self._before_switch)
        totals.merge(handle.totals)
        if totals.forwards == 0:
            return
        logs.update(
            {
                "sts/lm_flop_fraction": round(totals.executed_fraction, 4),
                "sts/visual_tokens_in": totals.visual_tokens_in,
                "sts/visual_tokens_kept": totals.visual_tokens_kept,
                "sts/layer_rows_run": totals.rows_run,
                "sts/layer_rows_total": totals.rows_total,
                "sts/stage": self.stage,
            }
        )
        self._before_switch.reset()
        handle.totals.reset()


def _live_handle(model):
    handle = sts_handle(model) if model is not None else None
    if handle is None:
        raise ValueError("StsCallback: the Trainer's model is not patched; call apply_sts first")
    return handle
