"""apply_sts under PEFT (LoRA) and TRL's SFTTrainer, tiny LLaVA on CPU.

PEFT wraps the model (PeftModel -> LoraModel -> LlavaForConditionalGeneration) and swaps the
attention projections inside the decoder layers for LoRA layers; the patch hooks the inner
model and replaces the decoder layers' forwards, so both orders of `get_peft_model` and
`apply_sts` compose. TRL's SFTTrainer computes its loss through a fused LM head
(`model(**batch, fused_lm_head=True)`, an instance-level forward on the inner model), which
runs after the patch's pre-hook and so scores the shrunk labels.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hf_models import IMG, llava_batch, make_llava
from test_training_stacks import _Recorder, _Rows

from sts_kernels.integrations.hf import apply_sts, sts_handle

peft = pytest.importorskip("peft")

SPARSE = {"seed": 0, "p_max": 0.9}  # skips some rows of the middle layers
DENSE_P = {"p_max": 0.0}  # every layer through the skipper's path, nothing skipped
ORDERS = ["peft_then_sts", "sts_then_peft"]


def lora_config(**extra):
    # init_lora_weights=False: A and B random, so both get gradients on the first step
    # (PEFT's default B = 0 leaves A's gradient zero)
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return peft.LoraConfig(**(kwargs | extra))


def lora_llava(order: str, **apply_kwargs):
    """A PEFT LoRA model over a patched tiny LLaVA, patched and wrapped in `order`. Returns
    (peft model, handle). `apply_sts` takes the PEFT wrapper itself (it patches the model the
    wrapper holds)."""
    torch.manual_seed(0)  # LoRA init
    if order == "peft_then_sts":
        wrapped = peft.get_peft_model(make_llava(), lora_config())
        handle = apply_sts(wrapped, **apply_kwargs)
        assert sts_handle(wrapped) is handle and sts_handle(wrapped.get_base_model()) is handle
    else:
        model = make_llava()
        handle = apply_sts(model, **apply_kwargs)
        wrapped = peft.get_peft_model(model, lora_config())
    return wrapped, handle


def lm_layers(model):
    return model.model.language_model.layers


def lora_params(module):
    return [p for n, p in module.named_parameters() if "lora_" in n]


def train_step(wrapped, batch):
    wrapped.train()
    loss = wrapped(**batch).loss
    loss.backward()
    return loss


@pytest.mark.parametrize("order", ORDERS)
def test_lora_step_is_sparser_and_trains_only_the_adapters(order):
    wrapped, handle = lora_llava(order, skip=SPARSE)
    loss = train_step(wrapped, llava_batch(pad_left=True))
    report = handle.report
    assert torch.isfinite(loss)
    assert (report.visual_tokens_in, report.visual_tokens_kept) == (3 * 16, 3 * 4)  # 2x2 pool
    assert report.lm_tokens < report.lm_tokens_in
    assert sum(report.rows_run) < sum(report.rows_total)

    frozen = [n for n, p in wrapped.named_parameters() if not p.requires_grad]
    assert frozen and all("lora_" not in n for n in frozen)
    assert [
        n for n, p in wrapped.named_parameters() if not p.requires_grad and p.grad is not None
    ] == []
    # a layer that ran rows trains its adapters; a layer skipped for every row joins the graph
    # with zero gradients (seed 0 skips one whole layer, so both branches below run)
    assert 0 in report.rows_run, report.rows_run
    for layer, run in zip(lm_layers(wrapped.get_base_model()), report.rows_run):
        grads = [p.grad for p in lora_params(layer)]
        assert len(grads) == 4  # q_proj, v_proj x A, B
        if run:
            assert all(g is not None and g.abs().sum() > 0 for g in grads), run
        else:
            assert all(g is not None and not g.any() for g in grads)  # joined (DDP)
    vision = wrapped.get_base_model().model.vision_tower
    assert all(p.grad.abs().sum() > 0 for p in lora_params(vision))


@pytest.mark.parametrize("order", ORDERS)
def test_lora_gradients_equal_unpatched_when_nothing_is_dropped(order):
    """No VTC, every layer through the skipper with nothing skipped: loss and LoRA gradients
    are the unpatched PEFT model's (a deepcopy, its copied patch removed)."""
    wrapped, handle = lora_llava(order, compress=False, skip=DENSE_P)
    reference = copy.deepcopy(wrapped)
    sts_handle(reference.get_base_model()).remove()
    batch = llava_batch(pad_left=False)
    loss, expected = train_step(wrapped, batch), train_step(reference, batch)
    assert sum(handle.report.rows_total) == 4 * 3  # the skipper ran every layer
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    for got, want in zip(lora_params(wrapped), lora_params(reference), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-6)


def lora_sgd_step(wrapped, batch):
    """One SGD step on the adapters, so that merging changes the base weights."""
    train_step(wrapped, batch)
    with torch.no_grad():
        for p in lora_params(wrapped):
            p -= 0.1 * p.grad
    wrapped.zero_grad()


@pytest.mark.parametrize("order", ORDERS)
def test_remove_then_merge_and_unload(order):
    wrapped, handle = lora_llava(order, skip=SPARSE)
    batch = llava_batch(pad_left=True)
    lora_sgd_step(wrapped, batch)
    handle.remove()
    inner = wrapped.get_base_model()
    assert sts_handle(inner) is None
    assert all("forward" not in m.__dict__ for m in inner.modules())
    assert not inner._forward_pre_hooks and not inner._forward_hooks

    # the unpatched PEFT model with the same weights: same train-mode logits (full length,
    # every layer), so nothing of the patch is left
    reference = peft.get_peft_model(make_llava(), lora_config())
    reference.load_state_dict(wrapped.state_dict())
    wrapped.train()
    reference.train()
    with torch.no_grad():
        logits = wrapped(**batch).logits
        assert logits.shape[:2] == batch["input_ids"].shape
        torch.testing.assert_close(logits, reference(**batch).logits, rtol=0, atol=0)

    before = {n: p.clone() for n, p in make_llava().named_parameters()}
    merged = wrapped.merge_and_unload()
    assert type(merged).__name__ == "LlavaForConditionalGeneration"
    assert lora_params(merged) == [] and sts_handle(merged) is None
    q = "model.language_model.layers.1.self_attn.q_proj.weight"
    assert not torch.allclose(dict(merged.named_parameters())[q], before[q])  # merged in
    merged.eval()
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            merged(**batch).logits, reference(**batch).logits, rtol=1e-5, atol=1e-5
        )


def test_merge_and_unload_while_patched_keeps_the_patch():
    """merge_and_unload swaps LoRA layers for merged Linear layers inside the decoder layers;
    the patched layer forwards and hooks stay with the returned model."""
    wrapped, handle = lora_llava("sts_then_peft", skip=SPARSE)
    merged = wrapped.merge_and_unload()
    assert sts_handle(merged) is handle and lora_params(merged) == []
    merged.train()  # PEFT froze every base weight: a forward, no backward
    assert torch.isfinite(merged(**llava_batch(pad_left=False)).loss)
    assert handle.report.visual_tokens_kept < handle.report.visual_tokens_in
    assert sum(handle.report.rows_run) < sum(handle.report.rows_total)
    handle.remove()
    assert all("forward" not in m.__dict__ for m in merged.modules())


ROUTER = {"policy": "router", "seed": 0}


def router_trains(wrapped, handle) -> list[bool]:
    """After a train step: per parameter of the skipper the patch calls, whether it trains."""
    train_step(wrapped, llava_batch(pad_left=False))
    params = list(handle.skipper.parameters())
    assert params
    return [p.requires_grad and p.grad is not None and bool(p.grad.any()) for p in params]


def test_router_skipper_trains_when_applied_after_get_peft_model(tmp_path):
    """PEFT freezes every parameter that exists when it wraps: a router skipper applied after
    get_peft_model trains next to the adapters, one applied before stays frozen."""
    wrapped, handle = lora_llava("peft_then_sts", skip=ROUTER)
    assert all(router_trains(wrapped, handle))
    # the adapter checkpoint holds the adapters only: the routers are saved on their own
    wrapped.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any("lora_" in k for k in saved) and not any("sts_skipper" in k for k in saved)

    wrapped, handle = lora_llava("sts_then_peft", skip=ROUTER)
    assert not any(router_trains(wrapped, handle))


def test_modules_to_save_trains_a_router_copy_the_patch_never_calls():
    """A trap the README warns about: `modules_to_save=["sts_skipper"]` makes a trainable copy
    of the router skipper, but the patch keeps calling the original (frozen) one."""
    torch.manual_seed(0)
    model = make_llava()
    handle = apply_sts(model, skip=ROUTER)
    wrapped = peft.get_peft_model(model, lora_config(modules_to_save=["sts_skipper"]))
    copy_params = [p for n, p in wrapped.named_parameters() if "modules_to_save" in n]
    assert copy_params and all(p.requires_grad for p in copy_params)
    assert not any(router_trains(wrapped, handle))
    assert all(p.grad is None for p in copy_params)


# ---------------------------------------------------------------------------------------------
# TRL


def tiny_tokenizer():
    """A word-level tokenizer over the tiny LLaVA's 1000 ids: "t5 <image>" -> [5, IMG] (TRL
    needs a processing class and the model has none offline)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"t{i}": i for i in range(3, IMG)}
    words = Tokenizer(WordLevel(vocab | {"<image>": IMG}, unk_token="<pad>"))
    words.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=words,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},  # never split by the pre-tokenizer
    )


def tiny_processor():
    """A LlavaProcessor for the tiny LLaVA: 32 px images, `<image>` -> 16 placeholders."""
    import transformers

    images = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    return transformers.LlavaProcessor(
        image_processor=images(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tiny_tokenizer(),
        patch_size=8,
        vision_feature_select_strategy="default",  # the model's: CLS dropped
        num_additional_image_tokens=1,
        image_token="<image>",
    )


def vision_rows(n: int):
    """TRL's standard vision format: text with an `<image>` marker and one image a row."""
    datasets = pytest.importorskip("datasets")
    image = pytest.importorskip("PIL.Image")
    gen = torch.Generator().manual_seed(3)
    rows = []
    for _ in range(n):
        pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=gen)
        words = " ".join(f"t{t}" for t in torch.randint(3, 900, (5,), generator=gen).tolist())
        text = words.replace(" ", " <image> ", 1)  # 1 word, the image, 4 words
        rows.append({"text": text, "images": [image.fromarray(pixels.numpy())]})
    return datasets.Dataset.from_list(rows)


class MaskPlaceholders:
    """A collator whose batches have -100 on the image placeholders' labels, as LLaVA training
    has (TRL 1.16's vision collator keeps them as targets)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, rows):
        batch = self.collator(rows)
        batch["labels"][batch["input_ids"] == IMG] = -100
        return batch


def collate(rows):
    from transformers import default_data_collator

    batch = default_data_collator(rows)
    return batch | {"attention_mask": torch.ones_like(batch["input_ids"])}


def tokenized_rows(n: int):
    """Pre-tokenized rows of _Rows (one image of 16 placeholders, 22 tokens) as a Dataset."""
    datasets = pytest.importorskip("datasets")
    rows = [{k: v.tolist() for k, v in r.items()} for r in _Rows(n).items]
    return datasets.Dataset.from_list(rows).with_format("torch")


def run_sft(tmp_path, model, steps: int, **trainer_kwargs):
    """SFTTrainer, 2 rows a micro-batch, 2 micro-batches a step, StsCallback first; by default
    over tokenized_rows. Returns the trainer and the training logs the reporters saw."""
    trl = pytest.importorskip("trl")
    from sts_kernels.integrations.hf import StsCallback

    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=steps,
        logging_steps=1,
        learning_rate=1e-3,
        bf16=False,
        gradient_checkpointing=True,  # TRL's default
        max_length=None,
        dataset_kwargs={"skip_prepare_dataset": True},  # already tokenized
        remove_unused_columns=False,  # keep pixel_values (or text and images)
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    defaults = dict(
        train_dataset=tokenized_rows(4 * steps),
        processing_class=tiny_tokenizer(),
        data_collator=collate,
    )
    trainer = trl.SFTTrainer(model=model, args=args, **(defaults | trainer_kwargs))
    recorder = _Recorder()
    trainer.add_callback(recorder)
    StsCallback.install(trainer)
    trainer.train()
    return trainer, [log for log in recorder.logs if "loss" in log]


def test_trl_fused_lm_head_scores_the_shrunk_labels():
    """TRL's fused LM head (its SFT loss) on the patched model, VTC only (deterministic): the
    model's own loss on the shrunk sequence, one log-prob per shrunk label."""
    pytest.importorskip("trl")
    from trl.trainer.utils import add_fused_lm_head

    model = make_llava()
    handle = apply_sts(model, stage="align")
    add_fused_lm_head(model, outputs=("log_probs", "is_top1"))
    model.train()
    batch = llava_batch(pad_left=True)
    fused = model(**batch, fused_lm_head=True)
    shrunk = handle.last_inputs["labels"]
    assert shrunk.shape[1] < batch["labels"].shape[1]
    assert torch.equal(fused.label_mask, shrunk[:, 1:] != -100)
    torch.testing.assert_close(fused.loss, model(**batch).loss, rtol=1e-5, atol=1e-6)


def assert_sts_log(log: dict) -> None:
    """One optimizer step of run_sft with VTC and SPARSE skipping, as StsCallback logs it."""
    assert torch.isfinite(torch.tensor(log["loss"])) and "mean_token_accuracy" in log
    # 2 micro-batches of 2 images of 4x4 patches pooled 2x2
    assert (log["sts/visual_tokens_in"], log["sts/visual_tokens_kept"]) == (64, 16)
    assert log["sts/layer_rows_total"] == 2 * 4 * 2  # micro-batches x layers x rows
    assert 2 * 2 * 2 <= log["sts/layer_rows_run"] < log["sts/layer_rows_total"]
    # 10 of 22 tokens left after pooling, times the rows run
    fraction = 10 / 22 * log["sts/layer_rows_run"] / log["sts/layer_rows_total"]
    assert log["sts/lm_flop_fraction"] == pytest.approx(fraction, abs=1e-4)


def test_sft_trainer_with_callback(tmp_path):
    model = make_llava()
    apply_sts(model, skip=SPARSE)
    before = lm_layers(model)[0].mlp.up_proj.weight.clone()
    _, logs = run_sft(tmp_path, model, steps=2)
    assert len(logs) == 2
    for log in logs:
        assert_sts_log(log)
    assert not torch.equal(lm_layers(model)[0].mlp.up_proj.weight, before)


def test_sft_trainer_with_peft_config_trains_the_adapters(tmp_path):
    """SFTTrainer(peft_config=...) wraps the patched model itself (the sts_then_peft order):
    the adapters move, the base weights do not, every step is compressed and skipped."""
    model = make_llava()
    handle = apply_sts(model, skip=SPARSE)
    mlp = lm_layers(model)[0].mlp.up_proj.weight.clone()  # not a LoRA target: stays in place
    # PEFT's default init (B = 0): a B that is not zero after training has been trained
    trainer, logs = run_sft(
        tmp_path, model, steps=2, peft_config=lora_config(init_lora_weights=True)
    )
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(log["loss"])) for log in logs)
    for log in logs:  # StsCallback finds the handle through the PEFT wrapper the Trainer holds
        assert_sts_log(log)
    wrapped = trainer.model
    assert wrapped.get_base_model() is model
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for layer in (lm_layers(model)[0], lm_layers(model)[-1]):  # never skipped (keep_first_last)
        b_weights = [p for n, p in layer.named_parameters() if "lora_B" in n]
        assert len(b_weights) == 2 and all(p.abs().sum() > 0 for p in b_weights)
    assert torch.equal(lm_layers(model)[0].mlp.up_proj.weight, mlp)
    assert handle.report.visual_tokens_kept < handle.report.visual_tokens_in
    assert sum(handle.report.rows_run) < sum(handle.report.rows_total)


def test_sft_trainer_vision_data_path_loss_is_the_token_mean(tmp_path):
    """TRL's own VLM path (the processor expands `<image>` on the fly), VTC only, one step of
    all 4 rows: the logged loss is the patched model's own loss on the 4 rows at once, i.e.
    the Trainer's token count (`num_items_in_batch`, from the caller's labels) counts exactly
    the labels the shrunk sequences keep. That holds when the placeholders' labels are -100."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    model = make_llava()
    apply_sts(model, stage="align")
    reference = copy.deepcopy(model)
    processor = tiny_processor()
    data = vision_rows(4)
    collator = MaskPlaceholders(DataCollatorForVisionLanguageModeling(processor))
    _, logs = run_sft(
        tmp_path,
        model,
        steps=1,
        train_dataset=data,
        processing_class=processor,
        data_collator=collator,
    )
    batch = collator(list(data))
    assert batch["input_ids"].shape == (4, 5 + 16) and batch["pixel_values"].shape[0] == 4
    reference.train()
    expected = reference(**batch).loss.item()
    assert logs[0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert (logs[0]["sts/visual_tokens_in"], logs[0]["sts/visual_tokens_kept"]) == (64, 16)


def test_placeholder_targets_dropped_by_vtc_are_flagged(tmp_path):
    """Placeholders kept as loss targets (TRL 1.16's vision collator as it is): VTC drops
    targets that a count of the caller's labels (num_items_in_batch) includes, which scales
    the loss down silently (a logged 2.76 instead of 6.91 on this model). TRL normalises
    outside the model: a warning; a model handed num_items_in_batch itself: a ValueError."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    model = make_llava()
    apply_sts(model, stage="align")
    processor = tiny_processor()
    collator = DataCollatorForVisionLanguageModeling(processor)
    match = "tokens whose labels are loss targets"
    with pytest.warns(UserWarning, match=match):
        run_sft(
            tmp_path,
            model,
            steps=1,
            train_dataset=vision_rows(4),
            processing_class=processor,
            data_collator=collator,
        )
    batch = collator(list(vision_rows(4)))
    counted = (batch["labels"] != -100).sum()
    with pytest.raises(ValueError, match=match):
        model(**batch, num_items_in_batch=counted)
    masked = MaskPlaceholders(collator)(list(vision_rows(4)))
    model(**masked, num_items_in_batch=(masked["labels"] != -100).sum())  # nothing dropped


def test_targets_on_padding_are_named_as_padding():
    """Labels left on padding columns, which VTC drops with the placeholders, are reported as
    padding targets (not blamed on placeholders that are already -100)."""
    model = make_llava()
    apply_sts(model, stage="align")
    model.train()
    batch = llava_batch(pad_left=True)
    padding = batch["attention_mask"] == 0
    batch["labels"] = torch.where(padding, 3, batch["labels"])  # real labels on padding
    with pytest.raises(ValueError, match=f"0 visual placeholder and {int(padding.sum())} padding"):
        model(**batch, num_items_in_batch=(batch["labels"] != -100).sum())


def test_sts_handle_reaches_through_nested_wrappers():
    """DDP(PeftModel(model)): `.module` holds the PeftModel, which holds the patched model."""
    wrapped, handle = lora_llava("peft_then_sts")

    class Outer(torch.nn.Module):  # a DDP-like wrapper: the model at `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert sts_handle(Outer(wrapped)) is handle
    assert sts_handle(Outer(Outer(wrapped))) is handle
    assert sts_handle(Outer(make_llava())) is None
