"""apply_sts under what training stacks do to a model: deepcopy / pickle (EMA and reference
models), re-applying, losses computed outside the model, generate() in train(), the Trainer
with StsCallback (tiny LLaVA, CPU)."""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch
import torch.nn.functional as F
from hf_models import IMG, llava_batch, make_llava

from sts_kernels.integrations.hf import StsTotals, apply_sts, sts_handle

DENSE_P = {"p_max": 0.0}  # every layer runs through the skipper's path, nothing is skipped


def lm_layers(model):
    return model.model.language_model.layers


def train_logits(model, batch):
    model.train()
    return model(**batch).logits


def test_deepcopy_is_patched_and_bound_to_its_own_layers():
    model = make_llava()
    handle = apply_sts(model, skip=DENSE_P)
    batch = llava_batch(pad_left=False)
    before = train_logits(model, batch).detach()

    twin = copy.deepcopy(model)
    twin_handle = sts_handle(twin)
    assert twin_handle is not handle and twin_handle.model is twin
    assert torch.equal(train_logits(twin, batch), before)
    assert twin_handle.report.visual_tokens_kept < twin_handle.report.visual_tokens_in
    assert sum(twin_handle.report.rows_total) > 0  # its own skipper ran its own layers

    with torch.no_grad():
        for p in lm_layers(twin).parameters():
            p.zero_()
    logits = train_logits(twin, batch)
    assert not torch.allclose(logits, before)
    assert torch.equal(train_logits(model, batch), before)

    logits.sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert any(p.grad is not None for p in lm_layers(twin).parameters())

    twin_handle.remove()  # undoes the copy only
    assert "forward" not in lm_layers(twin)[1].__dict__
    assert "forward" in lm_layers(model)[1].__dict__


def test_torch_save_round_trip_keeps_an_independent_patch():
    model = make_llava()  # pickles only before its first forward: transformers then adds
    apply_sts(model, skip=DENSE_P)  # local-function hooks (unpatched models alike)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    batch = llava_batch(pad_left=True)
    before = train_logits(model, batch).detach()
    assert torch.equal(train_logits(loaded, batch), before)
    with torch.no_grad():
        lm_layers(loaded)[2].mlp.down_proj.weight.zero_()
    assert not torch.allclose(train_logits(loaded, batch), before)
    assert torch.equal(train_logits(model, batch), before)
    sts_handle(loaded).remove()
    assert sts_handle(loaded) is None and sts_handle(model) is not None


def test_stale_handle_never_touches_a_newer_patch():
    model = make_llava()
    reference = copy.deepcopy(model)
    batch = llava_batch(pad_left=False)
    first = apply_sts(model)
    first.remove()
    second = apply_sts(model)
    first.remove()  # stale: a no-op
    assert sts_handle(model) is second
    with pytest.raises(RuntimeError, match="already patched"):
        apply_sts(model)
    second.remove()
    second.remove()
    assert sts_handle(model) is None
    assert all("forward" not in layer.__dict__ for layer in lm_layers(model))
    assert "generate" not in model.__dict__
    assert not model._forward_pre_hooks and not model._forward_hooks
    torch.testing.assert_close(model(**batch).loss, reference(**batch).loss, rtol=0, atol=0)


def test_last_inputs_hold_no_graph():
    model = make_llava()
    handle = apply_sts(model)
    model.train()
    model(**llava_batch(pad_left=False))
    assert "mm_encoder_outputs" not in handle.last_inputs
    for name, value in handle.last_inputs.items():
        if isinstance(value, torch.Tensor):
            assert value.grad_fn is None and not value.requires_grad, name


def shifted_loss(logits, labels):
    """The causal LM loss of HF's ForCausalLMLoss, computed outside the model."""
    logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("pad_left", [False, True])
def test_loss_outside_the_model_sees_full_length_logits(pad_left):
    """VTC only (deterministic): without labels the logits come back at the caller's length
    and a loss computed from them equals the model's own loss on the shrunk batch."""
    model = make_llava()
    handle = apply_sts(model, stage="align")
    model.train()
    batch = llava_batch(pad_left=pad_left)
    labels = batch.pop("labels")
    inside = model(**batch, labels=labels)
    shrunk_labels = handle.last_inputs["labels"]
    assert inside.logits.shape[1] < labels.shape[1]  # the model's own loss: shrunk logits

    outside = model(**batch)
    assert outside.logits.shape[:2] == labels.shape
    torch.testing.assert_close(shifted_loss(outside.logits, labels), inside.loss)
    assert torch.equal(handle.shrink(labels), shrunk_labels)

    handle.full_logits = True  # on request also with labels
    assert model(**batch, labels=labels).logits.shape[:2] == labels.shape


def test_shrink_rejects_another_batch():
    model = make_llava()
    handle = apply_sts(model, stage="align")
    model.train()
    batch = llava_batch(pad_left=False)
    model(**batch)
    with pytest.raises(ValueError, match="batch size 3"):
        handle.shrink(batch["labels"][:2])


def test_generate_in_train_mode_runs_dense():
    model = make_llava()
    batch = llava_batch(pad_left=True)
    del batch["labels"]
    model.train()
    expected = model.generate(**batch, max_new_tokens=3, do_sample=False)
    handle = apply_sts(model, skip={"p_max": 0.9, "seed": 0})
    got = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert torch.equal(got, expected)
    assert not handle._generating
    model(**batch)  # training forwards are compressed again
    assert handle.report.visual_tokens_kept < handle.report.visual_tokens_in


def test_totals_sum_every_training_forward():
    model = make_llava()
    handle = apply_sts(model, skip={"seed": 0})
    model.train()
    batch = llava_batch(pad_left=False)
    reports = []
    for _ in range(3):
        model(**batch)
        reports.append(handle.report)
    expected = StsTotals()
    for report in reports:
        expected.add(report)
    assert handle.totals == expected
    assert handle.totals.visual_tokens_in == 3 * reports[0].visual_tokens_in
    assert handle.totals.rows_total == 3 * sum(reports[0].rows_total)
    model.eval()
    model(**batch)
    assert handle.totals == expected  # evaluation forwards are not training work


# ---------------------------------------------------------------------------------------------
# transformers.Trainer


class _Rows(torch.utils.data.Dataset):
    """Each item one row of the LLaVA test batch (one image, placeholders fixed to 16)."""

    def __init__(self, n: int):
        gen = torch.Generator().manual_seed(2)
        self.items = []
        for _ in range(n):
            text = torch.randint(3, 900, (6,), generator=gen)
            ids = torch.cat([text[:2], torch.full((16,), IMG), text[2:]])
            labels = torch.where(ids == IMG, -100, ids)
            pixels = torch.randn(3, 32, 32, generator=gen)
            self.items.append({"input_ids": ids, "labels": labels, "pixel_values": pixels})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class _Recorder:
    """A reporting callback placed after StsCallback: what reached the reporters."""

    def __init__(self):
        self.logs = []

    def __getattr__(self, event):
        if not event.startswith("on_"):
            raise AttributeError(event)
        return self._event

    def _event(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            self.logs.append(dict(logs))


def run_trainer(tmp_path, label_smoothing: float, logging_steps: int = 1, **callback_kwargs):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from sts_kernels.integrations.hf import StsCallback

    model = make_llava()
    apply_sts(model, stage="align")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=4,
        logging_steps=logging_steps,
        learning_rate=1e-3,
        label_smoothing_factor=label_smoothing,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Rows(16))
    recorder = _Recorder()
    trainer.add_callback(recorder)
    StsCallback.install(trainer, **callback_kwargs)
    trainer.train()
    return model, [log for log in recorder.logs if "loss" in log]


def test_callback_counts_a_log_window_spanning_the_switch(tmp_path):
    """Visual tokens are counted in every stage: a log window of one align step (2x2 pooling:
    64 in, 16 kept) and one instruct step (no VTC: 64 in, 64 kept) logs 128 / 80."""
    _, logs = run_trainer(tmp_path, label_smoothing=0.0, logging_steps=2, switch_step=1)
    assert len(logs) == 2
    assert logs[0]["sts/visual_tokens_in"] == 2 * 64
    assert logs[0]["sts/visual_tokens_kept"] == 16 + 64
    assert logs[1]["sts/visual_tokens_in"] == logs[1]["sts/visual_tokens_kept"] == 2 * 64


def test_trainer_with_label_smoothing_and_callback(tmp_path):
    model, logs = run_trainer(tmp_path, label_smoothing=0.1, switch_step=2)
    assert len(logs) == 4
    for step, log in enumerate(logs):
        assert torch.isfinite(torch.tensor(log["loss"]))
        if step < 2:  # align: 2x2 pooling, every layer dense, no skipper
            assert log["sts/stage"] == 0
            # 2 micro-batches of 2 images of 4x4 patches per optimizer step
            assert log["sts/visual_tokens_in"] == 2 * 2 * 16
            assert log["sts/visual_tokens_kept"] == 2 * 2 * 4
            assert log["sts/layer_rows_run"] == log["sts/layer_rows_total"] == 0
            # 22 tokens per row, 16 - 4 placeholders removed
            assert log["sts/lm_flop_fraction"] == round(10 / 22, 4)
        else:  # instruct: no VTC (every visual token reaches the LM), sample-mode skipping
            assert log["sts/stage"] == 1
            assert log["sts/visual_tokens_in"] == log["sts/visual_tokens_kept"] == 2 * 2 * 16
            assert log["sts/layer_rows_total"] == 2 * 4 * 2  # micro-batches x layers x rows
            run = log["sts/layer_rows_run"]
            assert 2 * 2 * 2 <= run <= log["sts/layer_rows_total"]  # first, last layer dense
            assert log["sts/lm_flop_fraction"] == round(run / log["sts/layer_rows_total"], 4)
    assert sts_handle(model).compressor is None and sts_handle(model).skipper is not None


def test_callback_refuses_bad_arguments_and_a_switch_adding_parameters():
    pytest.importorskip("transformers")
    from types import SimpleNamespace

    from sts_kernels.integrations.hf import StsCallback

    with pytest.raises(ValueError, match="switch_step"):
        StsCallback(switch_step=-1)
    model = make_llava()
    apply_sts(model, stage="align")
    callback = StsCallback(
        switch_step=0, switch_to={"stage": "instruct", "skip": {"policy": "router"}}
    )
    with pytest.raises(ValueError, match="sts_skipper"):
        callback.on_step_begin(None, SimpleNamespace(global_step=0), None, model=model)
    assert not hasattr(model, "sts_skipper")
    with pytest.raises(ValueError, match="not patched"):
        StsCallback(switch_step=0).on_step_begin(
            None, SimpleNamespace(global_step=0), None, model=make_llava()
        )


# ---------------------------------------------------------------------------------------------
# torch.compile


def deep_llava(layers: int):
    """make_llava with `layers` decoder layers: more than Dynamo's recompile limit (8), so a
    guard on the layer index would hit it."""
    from hf_models import IMG, clip_config, llama_config
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    text = llama_config()
    text.num_hidden_layers = layers
    config = LlavaConfig(
        vision_config=clip_config(),
        text_config=text,
        image_token_index=IMG,
        vision_feature_layer=-1,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config)


class GraphRecorder:
    """A torch.compile backend that runs graphs eagerly and keeps, per compiled graph, the
    source files its nodes came from and its call targets."""

    def __init__(self):
        self.graphs: list[tuple[set[str], list[str]]] = []

    def __call__(self, gm, example_inputs):
        files, targets = set(), []
        for node in gm.graph.nodes:
            files.update(re.findall(r'File "[^"]*/([\w.]+)"', node.meta.get("stack_trace") or ""))
            if node.op in ("call_function", "call_method", "call_module"):
                targets.append(str(node.target))
        self.graphs.append((files, targets))
        return gm


def sts_losses(layers: int, skip: dict, recorder: GraphRecorder | None = None) -> list[float]:
    """Losses of 3 training steps of a patched `deep_llava(layers)`, compiled with `recorder`
    as the backend when one is given (from a fresh Dynamo state), else eager."""
    import torch._dynamo as dynamo

    dynamo.reset()
    model = deep_llava(layers)
    apply_sts(model, skip={"seed": 0, **skip})
    model.train()
    call = model if recorder is None else torch.compile(model, backend=recorder)
    batch = llava_batch(pad_left=False)
    losses = []
    for _ in range(3):
        loss = call(**batch).loss
        loss.backward()
        losses.append(loss.item())
    return losses


def unpatched_graphs(layers: int) -> int:
    """Graphs torch.compile makes of the unpatched `deep_llava(layers)`'s training step."""
    import torch._dynamo as dynamo

    dynamo.reset()
    model = deep_llava(layers).train()
    recorder = GraphRecorder()
    torch.compile(model, backend=recorder)(**llava_batch(pad_left=False)).loss.backward()
    return len(recorder.graphs)


COMPILE_CASES = {
    "sample": {"mode": "sample"},
    "token": {"mode": "token"},
    "importance": {"policy": "importance"},  # its EMA is updated inside the compiled graph
    "layer_skipped_by_all": {"seed": 3, "p_max": 0.9},  # a layer no row runs, in step 2
    "router": {"policy": "router"},  # decides layer by layer: a graph break per layer
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(COMPILE_CASES))
def test_torch_compile_of_the_patched_model(case):
    """VTC + LDS under torch.compile: the same losses as eager (every decision and the
    importance EMA included); the decoder layers run inside compiled graphs (a graph holding
    skip_residual holds a layer's 7 projections); no frame recompiles near Dynamo's limit
    (10 layers: more than the limit of 8). Decisions drawn ahead by the pre-hook leave no
    graph break in the decoder: at most 2 graphs more than the unpatched model (7 with
    transformers 5.24 / torch 2.13; the patch adds the pre-hook's eager draw). The router
    policy breaks once per layer, which makes Dynamo split Hugging Face's wrapper frames (an
    unpatched model with one no-op disabled hook on a layer: 20 graphs); its count does not
    grow with depth."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import guard_failures

    skip, recorder = COMPILE_CASES[case], GraphRecorder()
    losses = sts_losses(10, skip, recorder)
    recompiles = {code.co_name: len(f) for code, f in guard_failures.items()}
    torch.testing.assert_close(losses, sts_losses(10, skip))
    assert max(recompiles.values(), default=0) < dynamo.config.recompile_limit - 1, recompiles
    layer_graphs = [t for files, t in recorder.graphs if "skip_residual.py" in files]
    assert layer_graphs, "skip_residual never ran inside a compiled graph"
    assert all(sum("linear" in name for name in t) >= 7 for t in layer_graphs), layer_graphs
    if case == "router":
        shallow = GraphRecorder()
        sts_losses(6, skip, shallow)
        assert len(shallow.graphs) == len(recorder.graphs)
    else:
        assert len(recorder.graphs) <= unpatched_graphs(10) + 2, len(recorder.graphs)


@pytest.mark.parametrize("policy", ["schedule", "router"])
def test_gradient_checkpointing_reuses_the_decisions(policy):
    """HF gradient checkpointing wraps each decoder layer's own forward, which the skipper
    calls on the kept rows: its recompute never redraws a decision, so loss and every
    gradient equal the run without checkpointing."""

    def run(checkpointing: bool):
        model = make_llava()
        apply_sts(model, skip={"seed": 0, "p_max": 0.7, "policy": policy})
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        loss = model(**llava_batch(pad_left=False)).loss
        loss.backward()
        return loss.item(), [p.grad for p in model.parameters() if p.grad is not None]

    (loss_a, grads_a), (loss_b, grads_b) = run(False), run(True)
    assert loss_a == loss_b and len(grads_a) == len(grads_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def test_decisions_drawn_for_a_forward_end_with_it():
    """The pre-hook's decisions serve that forward only: afterwards (even when the forward
    raised) the skipper holds none, and calls of the inner language model, which bypass the
    pre-hook, draw fresh ones each time."""
    model = make_llava()
    handle = apply_sts(model, compress=False, skip={"seed": 0, "p_max": 0.9})
    model.train()
    batch = llava_batch(pad_left=False)
    model(**batch)
    assert handle.skipper._steps is None
    with pytest.raises(ValueError):  # raised in the loss, after the decoder ran
        model(**{**batch, "labels": batch["labels"][:, :-1]})
    assert handle.skipper._steps is None
    embeds = model.get_input_embeddings()(batch["input_ids"])
    masks = []
    for _ in range(4):
        model.model.language_model(inputs_embeds=embeds)
        masks.append([m.clone() for m in handle.skipper.report.keep_masks if m is not None])
    assert any(not all(map(torch.equal, masks[0], later)) for later in masks[1:])
