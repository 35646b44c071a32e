"""A sweep of tiny HuggingFace transformers models through jdoptim, against the explicit Jacobian.

Each model is built from a tiny random-init config (no downloads), in float64 and train mode
with its default dropout, and gives two losses per sample (``[b, 2]``). Four layouts are taken
from them: per-sample (``[b]``, ``batch_dim=0``), ``[batch, tasks]`` (``batch_dim=0``), task
losses (the batch means, ``batch_dim=None``), and per-sample with ``low_memory=True``. Each
layout runs 3 steps, so that the steps after the first, which reuse the route the engine
remembered, are checked too. At every step, ``Engine.compute_gramian`` must give ``J Jᵀ``, and
one ``JDOptimizer`` step with UPGrad must give that Gramian, UPGrad's weights ``w`` of it, and
``.grad = Jᵀ w``, where ``J`` is the explicit Jacobian of the same losses (one ``autograd.grad``
per loss on the same graph, hence the same dropout masks: ``tests.autogram._oracle``).

In the first three layouts an Engine and a ``JDOptimizer(modules=model)`` are hooked on the same
model and fed the same forward, as in ``tests/autogram/test_real_models.py``. A row that comes out
WRONG, CRASH, or REFUSED without a module path is run again with the JDOptimizer alone, then the
Engine alone on a fresh build. The low-memory layout always runs the two separately.

Outcomes (tolerance 1e-9 relative on the Gramians and ``.grad``; 1e-6 relative on the update
``Jᵀw`` the weights give against the oracle weights' ``Jᵀw*``; the weights' own largest
difference is reported, not graded: on a Gramian of condition number ~1e8, UPGrad's weights
from two Gramians equal to 3e-16 differ by ~1e-6 in directions that barely move the update,
SEW-D at batch 16):

* EXACT: every step within tolerance.
* F32: a model with float32 internals (seen by a torch function mode in a forward without
  jdoptim) that misses the tolerance but stays within 1e-6.
* WRONG: any other miss; no error is raised.
* CRASH: an exception from torch or transformers under a jdoptim call, or from a torch call in
  jdoptim's own code.
* REFUSED: a ``raise`` in jdoptim. The report says whether its message names a module path of
  the model.
* Rows that check nothing: BUILD (the model fails without jdoptim), TIMEOUT (a layout over 60 s),
  SKIPPED (the model's 150 s are spent).

The Markdown report (``--out``) opens with the WRONG, CRASH and REFUSED-without-module-path rows,
each with the command that reruns it, then the F32 rows, then a table of every row. Stdout gets a
line per row and a line of counts. Run from the repository root::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python benchmarks/model_zoo.py \\
        [--only NAME[@bN],...] [--layout L] [--batches 3,4,8] [--out PATH.md]

``NAME@bN`` runs NAME at batch N only (default: each of ``--batches``, default 3); ``--list``
prints the names.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import subprocess
import time
import traceback
import warnings
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.nn.functional as F
import transformers as T
from torch import Tensor, nn

import jdoptim
from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGrad, UPGradWeighting
from jdoptim.autogram import Engine, EngineRouteWarning
from tests.autogram._oracle import as_square, explicit_jacobian

Run = Callable[[nn.Module], Tensor]
Built = tuple[nn.Module, Run]
Builder = Callable[[int], Built]

TOL = 1e-9
WEIGHTS_TOL = 1e-6
F32_TOL = 1e-6
STEPS = 3
LAYOUT_TIMEOUT = 60  # seconds per (model, layout)
MODEL_BUDGET = 150  # seconds per model: the layouts left past it are skipped
DEFAULT_BATCH = 3
VOCAB = 40
S = 8  # sequence length (most models)
JDOPTIM_DIR = Path(jdoptim.__file__).parent  # (as the tracebacks spell it)
REPO = Path(__file__).resolve().parent.parent

#: loss layout → (how to take it from the [b, 2] losses, batch_dim, low_memory)
LAYOUTS: dict[str, tuple[Callable[[Tensor], Tensor], int | None, bool]] = {
    "per_sample": (lambda losses: losses[:, 0], 0, False),
    "batch_tasks": (lambda losses: losses, 0, False),
    "tasks": (lambda losses: losses.mean(0), None, False),
    "per_sample_lowmem": (lambda losses: losses[:, 0], 0, True),
}


# ------------------------------------------------------------------------------ losses, inputs
def lm_losses(logits: Tensor, tokens: Tensor) -> Tensor:
    """``[b, 2]``: next-token CE (mean over positions), and tanh² of the last position's logits."""
    b, s, v = logits.shape
    ce = F.cross_entropy(
        logits[:, :-1].reshape(-1, v), tokens[:, 1:].reshape(-1), reduction="none"
    ).view(b, s - 1)
    return torch.stack([ce.mean(1), logits[:, -1].tanh().pow(2).mean(-1)], dim=1)


def mlm_losses(logits: Tensor, targets: Tensor) -> Tensor:
    """``[b, 2]``: CE against ``targets``, mean over the first and over the second half."""
    b, s, v = logits.shape
    ce = F.cross_entropy(logits.reshape(-1, v), targets.reshape(-1), reduction="none").view(b, s)
    h = s // 2
    return torch.stack([ce[:, :h].mean(1), ce[:, h:].mean(1)], dim=1)


def class_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """``[b, 2]``: CE against ``labels``, and the sum of the logits' sines."""
    ce = F.cross_entropy(logits, labels, reduction="none")
    return torch.stack([ce, logits.sin().sum(-1)], dim=1)


def tokens(b: int, seq: int = S) -> Tensor:
    """Random token ids ``[b, seq]`` above the special ids 0–2."""
    return torch.randint(3, VOCAB, (b, seq))


def labels(b: int, n: int = 3) -> Tensor:
    """Random class labels ``[b]`` in ``0..n-1``."""
    return torch.randint(0, n, (b,))


def images(b: int, size: int = 16, channels: int = 3) -> Tensor:
    """Random float64 images ``[b, channels, size, size]``."""
    return torch.randn(b, channels, size, size, dtype=torch.float64)


def padding_mask(b: int, seq: int, pad: bool) -> Tensor:
    """An attention mask of ones, with the last 3 positions of sample 0 padded if ``pad``."""
    mask = torch.ones(b, seq, dtype=torch.long)
    if pad:
        mask[0, seq - 3 :] = 0
    return mask


# ------------------------------------------------------------------------------ builder kinds
def _make(model_cls: str, config_cls: str, **cfg: Any) -> nn.Module:
    return getattr(T, model_cls)(getattr(T, config_cls)(**cfg))


def causal(
    b: int, model_cls: str, config_cls: str, double_logits: bool = False, **cfg: Any
) -> Built:
    """A causal LM with ``lm_losses``; ``double_logits`` casts logits from float32 internals."""
    model = _make(model_cls, config_cls, **cfg)
    ids = tokens(b)

    def run(m: nn.Module) -> Tensor:
        logits = m(input_ids=ids).logits
        return lm_losses(logits.double() if double_logits else logits, ids)

    return model, run


def masked(
    b: int, model_cls: str, config_cls: str, pad: bool = True, seq: int = S, **cfg: Any
) -> Built:
    """A masked LM with ``mlm_losses`` (sample 0 padded if ``pad``)."""
    model = _make(model_cls, config_cls, **cfg)
    ids, targets, mask = tokens(b, seq), tokens(b, seq), padding_mask(b, seq, pad)
    return model, lambda m: mlm_losses(m(input_ids=ids, attention_mask=mask).logits, targets)


def seqcls(
    b: int, model_cls: str, config_cls: str, pad: bool = True, seq: int = S, **cfg: Any
) -> Built:
    """A 3-class sequence classifier with ``class_losses`` (sample 0 padded if ``pad``)."""
    model = _make(model_cls, config_cls, num_labels=3, **cfg)
    ids, mask, y = tokens(b, seq), padding_mask(b, seq, pad), labels(b)
    return model, lambda m: class_losses(m(input_ids=ids, attention_mask=mask).logits, y)


def imagecls(
    b: int, model_cls: str, config_cls: str, size: int = 16, channels: int = 3, **cfg: Any
) -> Built:
    """A 3-class image classifier with ``class_losses``."""
    model = _make(model_cls, config_cls, num_labels=3, **cfg)
    x, y = images(b, size, channels), labels(b)
    return model, lambda m: class_losses(m(pixel_values=x).logits, y)


def audiocls(b: int, model_cls: str, config_cls: str, length: int = 400, **cfg: Any) -> Built:
    """A 3-class audio classifier on raw waveforms, with ``class_losses``."""
    model = _make(model_cls, config_cls, num_labels=3, **cfg)
    audio, y = torch.randn(b, length, dtype=torch.float64), labels(b)
    return model, lambda m: class_losses(m(input_values=audio).logits, y)


def decoder_lm(model: nn.Module, b: int) -> Built:
    """An encoder–decoder ``model`` with ``lm_losses`` on a 6-token decoder input (``b``
    samples of ``S`` source tokens)."""
    source, target = tokens(b), tokens(b, 6)

    def run(m: nn.Module) -> Tensor:
        return lm_losses(m(input_ids=source, decoder_input_ids=target).logits, target)

    return model, run


def seq2seq(b: int, model_cls: str, config_cls: str, **cfg: Any) -> Built:
    """A BART-style encoder–decoder with ``lm_losses`` on a 6-token decoder input."""
    base: dict[str, Any] = dict(
        vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_position_embeddings=32,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
    )  # fmt: skip
    model = _make(model_cls, config_cls, **{**base, **cfg})
    return decoder_lm(model, b)


LLAMA_LIKE: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
)  # fmt: skip
BERT_LIKE: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=32, max_position_embeddings=32,
)  # fmt: skip
W2V_LIKE: dict[str, Any] = dict(
    hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
    conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
    num_conv_pos_embedding_groups=2, mask_time_prob=0.0, classifier_proj_size=8,
)  # fmt: skip
WHISPER_LIKE: dict[str, Any] = dict(
    vocab_size=VOCAB, num_mel_bins=8, encoder_attention_heads=2, decoder_layers=1,
    decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, d_model=16,
    max_source_positions=8, max_target_positions=16, dropout=0.1, attention_dropout=0.1,
    activation_dropout=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    decoder_start_token_id=1,
)  # fmt: skip


# -------------------------------------------------------------------- models with own inputs
def _clip_text(b: int) -> Built:
    model = _make(
        "CLIPTextModelWithProjection", "CLIPTextConfig",
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, projection_dim=8,
        attention_dropout=0.1, dropout=0.1, eos_token_id=2,
    )  # fmt: skip
    ids = tokens(b)
    ids[:, -1] = 2
    y = torch.randint(0, 8, (b,))
    return model, lambda m: class_losses(m(input_ids=ids).text_embeds, y)


def _clip_vision(b: int) -> Built:
    model = _make(
        "CLIPForImageClassification", "CLIPConfig",
        text_config=dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(image_size=16, patch_size=4, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=2, num_attention_heads=2,
                           attention_dropout=0.1, dropout=0.1),
        num_labels=3,
    )  # fmt: skip
    x, y = images(b), labels(b)
    return model, lambda m: class_losses(m(pixel_values=x).logits, y)


def _whisper_encoder(b: int) -> Built:
    model = _make(
        "WhisperForAudioClassification", "WhisperConfig",
        **WHISPER_LIKE, encoder_layers=2, num_labels=3, classifier_proj_size=8,
        use_weighted_layer_sum=False,
    )  # fmt: skip
    feats = torch.randn(b, 8, 16, dtype=torch.float64)  # [b, mel, 2·max_source_positions]
    y = labels(b)
    return model, lambda m: class_losses(m(input_features=feats).logits, y)


def _whisper(b: int) -> Built:
    model = _make(
        "WhisperForConditionalGeneration", "WhisperConfig",
        **WHISPER_LIKE, encoder_layers=1, suppress_tokens=[], begin_suppress_tokens=[],
    )  # fmt: skip
    feats = torch.randn(b, 8, 16, dtype=torch.float64)
    target = tokens(b, 6)

    def run(m: nn.Module) -> Tensor:
        return lm_losses(m(input_features=feats, decoder_input_ids=target).logits, target)

    return model, run


def _xlnet(b: int) -> Built:
    model = _make(
        "XLNetLMHeadModel", "XLNetConfig",
        vocab_size=VOCAB, d_model=16, n_layer=2, n_head=2, d_inner=32, dropout=0.1,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, mem_len=None,
    )  # fmt: skip
    ids = tokens(b)
    return model, lambda m: lm_losses(m(input_ids=ids, use_mems=False).logits, ids)


def _reformer(b: int) -> Built:
    model = _make(
        "ReformerModelWithLMHead", "ReformerConfig",
        vocab_size=VOCAB, hidden_size=16, num_attention_heads=2, attention_head_size=8,
        attn_layers=["local", "lsh"], feed_forward_size=32, axial_pos_embds=True,
        axial_pos_shape=[4, 4], axial_pos_embds_dim=[8, 8], max_position_embeddings=16,
        local_attn_chunk_length=4, lsh_attn_chunk_length=4, num_buckets=2, num_hashes=1,
        is_decoder=True, pad_token_id=0, eos_token_id=2, hidden_dropout_prob=0.1,
        local_attention_probs_dropout_prob=0.1, lsh_attention_probs_dropout_prob=0.1,
    )  # fmt: skip
    ids = tokens(b, 16)
    return model, lambda m: lm_losses(m(input_ids=ids).logits, ids)


def _big_bird(b: int, attention_type: str = "block_sparse") -> Built:
    model = _make(
        "BigBirdForSequenceClassification", "BigBirdConfig",
        **{**BERT_LIKE, "max_position_embeddings": 128}, attention_type=attention_type,
        block_size=2, num_random_blocks=2, num_labels=3,
    )  # fmt: skip
    # block-sparse attention needs seq > (5 + 2·num_random_blocks)·block_size = 18
    ids, y = tokens(b, 32), labels(b)
    return model, lambda m: class_losses(m(input_ids=ids).logits, y)


def _longformer(b: int) -> Built:
    model = _make(
        "LongformerForSequenceClassification", "LongformerConfig",
        **{**BERT_LIKE, "max_position_embeddings": 64}, attention_window=[4, 4], num_labels=3,
        pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )  # fmt: skip
    ids, y = tokens(b), labels(b)
    return model, lambda m: class_losses(m(input_ids=ids).logits, y)


def _funnel(b: int) -> Built:
    model = _make(
        "FunnelForSequenceClassification", "FunnelConfig",
        vocab_size=VOCAB, block_sizes=[1, 1], d_model=16, n_head=2, d_head=8, d_inner=32,
        max_position_embeddings=32, num_labels=3, num_decoder_layers=1,
    )  # fmt: skip
    ids, y = tokens(b), labels(b)
    return model, lambda m: class_losses(m(input_ids=ids).logits, y)


def _perceiver(b: int) -> Built:
    model = _make(
        "PerceiverForSequenceClassification", "PerceiverConfig",
        num_latents=4, d_latents=16, d_model=16, num_blocks=1, num_self_attends_per_block=1,
        num_self_attention_heads=2, num_cross_attention_heads=1, vocab_size=VOCAB,
        max_position_embeddings=16, num_labels=3, qk_channels=8, v_channels=16,
    )  # fmt: skip
    ids, y = tokens(b), labels(b)
    return model, lambda m: class_losses(m(inputs=ids).logits, y)


def _led(b: int) -> Built:
    return seq2seq(
        b, "LEDForConditionalGeneration", "LEDConfig", max_encoder_position_embeddings=32,
        max_decoder_position_embeddings=32, attention_window=[4], num_labels=3,
    )  # fmt: skip


def _t5_like(b: int, model_cls: str, config_cls: str, **cfg: Any) -> Built:
    """A T5-style encoder–decoder (relative attention buckets) with ``lm_losses``."""
    model = _make(
        model_cls, config_cls,
        **{**dict(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                  relative_attention_num_buckets=8, relative_attention_max_distance=16,
                  pad_token_id=0, eos_token_id=1, decoder_start_token_id=0), **cfg},
    )  # fmt: skip
    return decoder_lm(model, b)


def _fsmt(b: int) -> Built:
    model = _make(
        "FSMTForConditionalGeneration", "FSMTConfig",
        langs=["en", "de"], src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, d_model=16,
        encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_position_embeddings=32, attention_dropout=0.1, activation_dropout=0.1,
        tie_word_embeddings=False,
    )  # fmt: skip
    return decoder_lm(model, b)


def _prophetnet(b: int) -> Built:
    model = _make(
        "ProphetNetForConditionalGeneration", "ProphetNetConfig",
        vocab_size=VOCAB, hidden_size=16, encoder_ffn_dim=32, decoder_ffn_dim=32,
        num_encoder_layers=1, num_decoder_layers=1, num_encoder_attention_heads=2,
        num_decoder_attention_heads=2, max_position_embeddings=32, ngram=2, num_buckets=8,
        relative_max_distance=16,
    )  # fmt: skip
    source, target = tokens(b), tokens(b, 6)

    def run(m: nn.Module) -> Tensor:
        out = m(input_ids=source, decoder_input_ids=target)
        # the main stream's next-token CE, and the 2-gram stream's logits
        losses = lm_losses(out.logits, target)
        return torch.stack([losses[:, 0], out.logits_ngram.tanh().pow(2).mean((1, 2, 3))], 1)

    return model, run


def _speech_to_text(b: int) -> Built:
    model = _make(
        "Speech2TextForConditionalGeneration", "Speech2TextConfig",
        vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_source_positions=32, max_target_positions=16,
        num_conv_layers=2, conv_kernel_sizes=[3, 3], conv_channels=8,
        input_feat_per_channel=8, attention_dropout=0.1, activation_dropout=0.1,
    )  # fmt: skip
    feats = torch.randn(b, 16, 8, dtype=torch.float64)  # [b, frames, features]
    target = tokens(b, 6)

    def run(m: nn.Module) -> Tensor:
        return lm_losses(m(input_features=feats, decoder_input_ids=target).logits, target)

    return model, run


def _layoutlm(b: int) -> Built:
    model = _make(
        "LayoutLMForSequenceClassification", "LayoutLMConfig", **BERT_LIKE,
        max_2d_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    ids, mask, y = tokens(b), padding_mask(b, S, True), labels(b)
    corner = torch.randint(0, 32, (b, S, 2))
    bbox = torch.cat([corner, corner + torch.randint(0, 32, (b, S, 2))], -1)  # x0 y0 x1 y1

    def run(m: nn.Module) -> Tensor:
        return class_losses(m(input_ids=ids, bbox=bbox, attention_mask=mask).logits, y)

    return model, run


def _xmod(b: int) -> Built:
    model = _make(
        "XmodForSequenceClassification", "XmodConfig", **BERT_LIKE, pad_token_id=1,
        languages=["en_XX", "de_DE", "fr_XX"], default_language="en_XX", num_labels=3,
    )  # fmt: skip
    # a per-language adapter, picked per sample by boolean masks over the batch
    ids, mask, y = tokens(b), padding_mask(b, S, True), labels(b)
    lang = torch.arange(b) % 2  # en_XX, de_DE, ...: fr_XX unused

    def run(m: nn.Module) -> Tensor:
        return class_losses(m(input_ids=ids, lang_ids=lang, attention_mask=mask).logits, y)

    return model, run


def _markuplm(b: int) -> Built:
    model = _make(
        "MarkupLMForSequenceClassification", "MarkupLMConfig", **BERT_LIKE, max_depth=4,
        max_xpath_tag_unit_embeddings=16, max_xpath_subs_unit_embeddings=16, tag_pad_id=15,
        subs_pad_id=15, xpath_unit_hidden_size=8, pad_token_id=0, num_labels=3,
    )  # fmt: skip
    ids, mask, y = tokens(b), padding_mask(b, S, True), labels(b)
    tags, subs = torch.randint(0, 16, (b, S, 4)), torch.randint(0, 16, (b, S, 4))  # xpaths

    def run(m: nn.Module) -> Tensor:
        out = m(input_ids=ids, xpath_tags_seq=tags, xpath_subs_seq=subs, attention_mask=mask)
        return class_losses(out.logits, y)

    return model, run


def videocls(b: int, model_cls: str, config_cls: str, frames: int, **cfg: Any) -> Built:
    """A 3-class video classifier on ``[b, frames, 3, 16, 16]``, with ``class_losses``."""
    model = _make(model_cls, config_cls, num_labels=3, num_frames=frames, **cfg)
    x, y = torch.randn(b, frames, 3, 16, 16, dtype=torch.float64), labels(b)
    return model, lambda m: class_losses(m(pixel_values=x).logits, y)


def _vit_mae(b: int) -> Built:
    model = _make(
        "ViTMAEForPreTraining", "ViTMAEConfig", image_size=16, patch_size=4, hidden_size=16,
        num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        decoder_hidden_size=8, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=16, mask_ratio=0.5, hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )  # fmt: skip
    x = images(b)

    def run(m: nn.Module) -> Tensor:
        out = m(pixel_values=x)  # a fresh random mask each forward
        err = (out.logits - m.patchify(x)).pow(2).mean(-1)  # [b, patches]
        masked = (err * out.mask).sum(1) / out.mask.sum(1)
        kept = (err * (1 - out.mask)).sum(1) / (1 - out.mask).sum(1)
        return torch.stack([masked, kept], 1)

    return model, run


def _yolos(b: int) -> Built:
    model = _make(
        "YolosForObjectDetection", "YolosConfig", image_size=[16, 16], patch_size=4,
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        num_detection_tokens=3, use_mid_position_embeddings=True, num_labels=3,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )  # fmt: skip
    x, y, boxes = images(b), labels(b), torch.rand(b, 3, 4, dtype=torch.float64)

    def run(m: nn.Module) -> Tensor:
        out = m(pixel_values=x)
        ce = F.cross_entropy(out.logits[:, 0], y, reduction="none")
        return torch.stack([ce, (out.pred_boxes - boxes).abs().mean((1, 2))], 1)

    return model, run


def forecast(b: int, model_cls: str, config_cls: str, **cfg: Any) -> Built:
    """A point forecaster of 2 channels (16 steps → 4): squared and absolute errors, per sample."""
    model = _make(
        model_cls, config_cls, context_length=16, num_input_channels=2, prediction_length=4,
        **cfg,
    )  # fmt: skip
    past = torch.randn(b, 16, 2, dtype=torch.float64)
    future = torch.randn(b, 4, 2, dtype=torch.float64)

    def run(m: nn.Module) -> Tensor:
        pred = m(past_values=past).prediction_outputs  # [b, 4, 2]
        return torch.stack([(pred - future).pow(2).mean((1, 2)), (pred - 1).abs().mean((1, 2))], 1)

    return model, run


def probabilistic_forecast(b: int, model_cls: str, config_cls: str, **cfg: Any) -> Built:
    """A Student-t forecaster (lags 1–2, 8-step context → 4 steps, one time feature): the NLL
    of the future values, and the squared error of the distribution's location."""
    base: dict[str, Any] = dict(
        prediction_length=4, context_length=8, lags_sequence=[1, 2], num_time_features=1,
        d_model=16, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=16, decoder_ffn_dim=16,
        encoder_layerdrop=0.0, decoder_layerdrop=0.0,
    )  # fmt: skip
    model = _make(model_cls, config_cls, **{**base, **cfg})
    past = torch.randn(b, 10, dtype=torch.float64) + 3  # context + the largest lag
    past_time = torch.linspace(0, 1, 10, dtype=torch.float64).view(10, 1).expand(b, 10, 1)
    future = torch.randn(b, 4, dtype=torch.float64) + 3
    future_time = torch.linspace(1, 1.4, 4, dtype=torch.float64).view(4, 1).expand(b, 4, 1)

    def run(m: nn.Module) -> Tensor:
        out = m(
            past_values=past, past_time_features=past_time,
            past_observed_mask=torch.ones_like(past), future_values=future,
            future_time_features=future_time,
        )  # fmt: skip
        dist = m.output_distribution(out.params, loc=out.loc, scale=out.scale)
        nll = -dist.log_prob(future)  # [b, 4]
        return torch.stack([nll.mean(1), (out.params[1] - future).pow(2).mean(1)], 1)

    return model, run


def _suite(builder: str) -> Builder:
    """One of ``tests/autogram/test_real_models.py``'s own builders, at this sweep's batch."""

    def build(b: int) -> Built:
        from tests.autogram import test_real_models

        built: Built = getattr(test_real_models, builder)(batch=b)
        return built

    return build


def _at_batch(kind: Callable[..., Built], model_cls: str, config_cls: str, **cfg: Any) -> Builder:
    """The builder of one model of a builder ``kind``, taking only the batch size."""
    return lambda b: kind(b, model_cls, config_cls, **cfg)


_vision = functools.partial(_at_batch, imagecls)
_causal = functools.partial(_at_batch, causal)
_masked = functools.partial(_at_batch, masked)
_seqcls = functools.partial(_at_batch, seqcls)
_audio = functools.partial(_at_batch, audiocls)
_seq2seq = functools.partial(_at_batch, seq2seq)
_t5 = functools.partial(_at_batch, _t5_like)
_forecast = functools.partial(_at_batch, forecast)
_probabilistic = functools.partial(_at_batch, probabilistic_forecast)
_video = functools.partial(_at_batch, videocls)


_NO_HEADS = {k: v for k, v in BERT_LIKE.items() if k != "num_attention_heads"}
_SMALL_STAGES: dict[str, Any] = dict(hidden_sizes=[8, 16], depths=[1, 1])

MODELS: dict[str, Builder] = {
    # ------------------------------------------------------------------ decoder-only causal LMs
    "mistral": _causal("MistralForCausalLM", "MistralConfig", **LLAMA_LIKE, sliding_window=4),
    "mixtral": _causal(
        "MixtralForCausalLM", "MixtralConfig", **LLAMA_LIKE, num_local_experts=4,
        num_experts_per_tok=2, router_jitter_noise=0.1, experts_implementation="eager",
    ),
    "qwen2": _causal("Qwen2ForCausalLM", "Qwen2Config", **LLAMA_LIKE, attention_dropout=0.1),
    "qwen3": _causal("Qwen3ForCausalLM", "Qwen3Config", **LLAMA_LIKE, head_dim=4),
    "qwen2_moe": _causal(
        "Qwen2MoeForCausalLM", "Qwen2MoeConfig", **LLAMA_LIKE, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
        experts_implementation="eager",
    ),
    "gemma": _causal("GemmaForCausalLM", "GemmaConfig", **LLAMA_LIKE, head_dim=4),
    "gemma2": _causal(
        "Gemma2ForCausalLM", "Gemma2Config", **LLAMA_LIKE, head_dim=4, sliding_window=4,
        query_pre_attn_scalar=4,
    ),
    "gemma3": _causal(
        "Gemma3ForCausalLM", "Gemma3TextConfig", **LLAMA_LIKE, head_dim=4, sliding_window=4,
        query_pre_attn_scalar=4,
    ),
    "phi": _causal(
        "PhiForCausalLM", "PhiConfig", **LLAMA_LIKE, partial_rotary_factor=0.5,
        resid_pdrop=0.1, embd_pdrop=0.1, attention_dropout=0.1,
    ),
    "phi3": _causal(
        "Phi3ForCausalLM", "Phi3Config", **LLAMA_LIKE, resid_pdrop=0.1, embd_pdrop=0.1,
        attention_dropout=0.1, pad_token_id=0,
    ),
    "gpt_neox": _causal(
        "GPTNeoXForCausalLM", "GPTNeoXConfig", vocab_size=VOCAB, hidden_size=16,
        intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, rotary_pct=0.5, hidden_dropout=0.1, attention_dropout=0.1,
    ),
    "gptj": _causal(
        "GPTJForCausalLM", "GPTJConfig", vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2,
        n_positions=32, rotary_dim=4,
    ),
    "gpt_bigcode": _causal(
        "GPTBigCodeForCausalLM", "GPTBigCodeConfig", vocab_size=VOCAB, n_embd=16, n_layer=2,
        n_head=2, n_positions=32, multi_query=True,
    ),
    "gpt_neo": _causal(
        "GPTNeoForCausalLM", "GPTNeoConfig", vocab_size=VOCAB, hidden_size=16, num_layers=2,
        num_heads=2, attention_types=[[["global", "local"], 1]], window_size=4,
        max_position_embeddings=32,
    ),
    "falcon": _causal(
        "FalconForCausalLM", "FalconConfig", vocab_size=VOCAB, hidden_size=16,
        num_hidden_layers=2, num_attention_heads=4, hidden_dropout=0.1, attention_dropout=0.1,
    ),
    "falcon_alibi": _causal(
        "FalconForCausalLM", "FalconConfig", vocab_size=VOCAB, hidden_size=16,
        num_hidden_layers=2, num_attention_heads=4, alibi=True, hidden_dropout=0.1,
        attention_dropout=0.1,
    ),
    "bloom": _causal(
        "BloomForCausalLM", "BloomConfig", vocab_size=VOCAB, hidden_size=16, n_layer=2,
        n_head=2, hidden_dropout=0.1, attention_dropout=0.1,
    ),
    "mpt": _causal(  # (no attn_pdrop: transformers 5.25 types it as an int)
        "MptForCausalLM", "MptConfig", vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2,
        expansion_ratio=2, max_seq_len=32, attn_config={"alibi": True}, resid_pdrop=0.1,
        emb_pdrop=0.1,
    ),
    "codegen": _causal(
        "CodeGenForCausalLM", "CodeGenConfig", vocab_size=VOCAB, n_embd=16, n_layer=2,
        n_head=2, n_positions=32, n_ctx=32, rotary_dim=4,
    ),
    "stablelm": _causal(
        "StableLmForCausalLM", "StableLmConfig", **LLAMA_LIKE, partial_rotary_factor=0.5,
        hidden_dropout=0.1, attention_dropout=0.1,
    ),
    "olmo": _causal(
        "OlmoForCausalLM", "OlmoConfig", **LLAMA_LIKE, clip_qkv=8.0, pad_token_id=0
    ),
    "olmo2": _causal("Olmo2ForCausalLM", "Olmo2Config", **LLAMA_LIKE, pad_token_id=0),
    "starcoder2": _causal(
        "Starcoder2ForCausalLM", "Starcoder2Config", **LLAMA_LIKE, residual_dropout=0.1,
        embedding_dropout=0.1, attention_dropout=0.1,
    ),
    "cohere": _causal(
        "CohereForCausalLM", "CohereConfig", **LLAMA_LIKE, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    ),
    "granite": _causal(
        "GraniteForCausalLM", "GraniteConfig", **LLAMA_LIKE, embedding_multiplier=2.0,
        residual_multiplier=0.5, logits_scaling=2.0, attention_multiplier=0.25,
    ),
    "biogpt": _causal(
        "BioGptForCausalLM", "BioGptConfig", **BERT_LIKE, pad_token_id=1, bos_token_id=0,
        eos_token_id=2,
    ),
    "ctrl": _causal(
        "CTRLLMHeadModel", "CTRLConfig", vocab_size=VOCAB, n_embd=16, dff=32, n_layer=2,
        n_head=2, n_positions=32,
    ),
    "xlnet": _xlnet,
    "reformer": _reformer,
    # (Mamba's selective scan and RWKV's time mixing run in float32 in transformers' slow path)
    "mamba": _causal(
        "MambaForCausalLM", "MambaConfig", double_logits=True, vocab_size=VOCAB,
        hidden_size=16, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=3,
        time_step_rank=4, use_cache=False,
    ),
    "mamba2": _causal(
        "Mamba2ForCausalLM", "Mamba2Config", double_logits=True, vocab_size=VOCAB,
        hidden_size=16, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=3,
        num_heads=4, head_dim=8, n_groups=1, chunk_size=4, use_cache=False,
    ),
    "rwkv": _causal(
        "RwkvForCausalLM", "RwkvConfig", vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
        attention_hidden_size=16, intermediate_size=32, context_length=16, use_cache=False,
    ),
    "falcon_mamba": _causal(
        "FalconMambaForCausalLM", "FalconMambaConfig", double_logits=True, vocab_size=VOCAB,
        hidden_size=16, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=3,
        time_step_rank=4, use_cache=False,
    ),
    "opt": _causal(  # word embeddings of 8 projected in and out of the layers; post-LayerNorm
        "OPTForCausalLM", "OPTConfig", vocab_size=VOCAB, hidden_size=16, ffn_dim=32,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32,
        word_embed_proj_dim=8, do_layer_norm_before=False, attention_dropout=0.1,
        pad_token_id=1,
    ),
    "nemotron": _causal(
        "NemotronForCausalLM", "NemotronConfig", **LLAMA_LIKE, partial_rotary_factor=0.5,
        attention_dropout=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ),
    "persimmon": _causal(
        "PersimmonForCausalLM", "PersimmonConfig", vocab_size=VOCAB, hidden_size=16,
        intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=32, qk_layernorm=True, partial_rotary_factor=0.5,
        hidden_dropout=0.1, attention_dropout=0.1,
    ),
    "glm": _causal(
        "GlmForCausalLM", "GlmConfig", **LLAMA_LIKE, head_dim=4, partial_rotary_factor=0.5,
        attention_dropout=0.1, pad_token_id=0,
    ),
    "olmoe": _causal(
        "OlmoeForCausalLM", "OlmoeConfig", **LLAMA_LIKE, num_experts=4, num_experts_per_tok=2,
        clip_qkv=8.0, norm_topk_prob=True, pad_token_id=0, eos_token_id=2,
        experts_implementation="eager",
    ),
    "jetmoe": _causal(  # a mixture of attention heads and of MLP experts
        "JetMoeForCausalLM", "JetMoeConfig", vocab_size=VOCAB, hidden_size=16,
        intermediate_size=32, num_hidden_layers=2, num_key_value_heads=2, kv_channels=4,
        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
        attention_dropout=0.1,
    ),
    "dbrx": _causal(
        "DbrxForCausalLM", "DbrxConfig", vocab_size=VOCAB, d_model=16, n_heads=4, n_layers=2,
        max_seq_len=32, resid_pdrop=0.1, emb_pdrop=0.1,
        attn_config={"kv_n_heads": 2, "clip_qkv": 8.0, "attn_pdrop": 0.1, "rope_theta": 1e4},
        ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2,
                    "moe_jitter_eps": 0.1},
    ),
    "recurrent_gemma": _causal(
        "RecurrentGemmaForCausalLM", "RecurrentGemmaConfig", vocab_size=VOCAB, hidden_size=16,
        intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        lru_width=16, attention_window_size=4, conv1d_width=3,
        block_types=["recurrent", "attention"], attention_dropout=0.1,
    ),
    "jamba": _causal(  # a Mamba layer, then attention with a mixture of experts
        "JambaForCausalLM", "JambaConfig", **LLAMA_LIKE, num_experts=4, num_experts_per_tok=2,
        expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1,
        use_mamba_kernels=False, mamba_d_state=4, mamba_d_conv=3, mamba_expand=2,
        mamba_dt_rank=4, attention_dropout=0.1, use_cache=False, experts_implementation="eager",
    ),
    "zamba": _causal(  # the hybrid layers share one attention block
        "ZambaForCausalLM", "ZambaConfig", vocab_size=VOCAB, hidden_size=16,
        intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
        n_mamba_heads=2, max_position_embeddings=32, use_mamba_kernels=False, mamba_d_state=4,
        mamba_d_conv=3, mamba_expand=2, layers_block_type=["mamba", "hybrid", "hybrid"],
        attention_dropout=0.1, use_cache=False,
    ),
    "bamba": _causal(
        "BambaForCausalLM", "BambaConfig", **LLAMA_LIKE, attn_layer_indices=[1],
        mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=4, mamba_d_conv=3,
        mamba_expand=2, mamba_chunk_size=4, attention_dropout=0.1, use_cache=False,
    ),
    # ---------------------------------------------------------------------------- encoders
    "distilbert": _masked(
        "DistilBertForMaskedLM", "DistilBertConfig", vocab_size=VOCAB, dim=16, n_layers=2,
        n_heads=2, hidden_dim=32, max_position_embeddings=32,
    ),
    "roberta": _masked("RobertaForMaskedLM", "RobertaConfig", **BERT_LIKE, pad_token_id=1),
    "xlm_roberta": _seqcls(
        "XLMRobertaForSequenceClassification", "XLMRobertaConfig", **BERT_LIKE, pad_token_id=1
    ),
    "albert": _masked(
        "AlbertForMaskedLM", "AlbertConfig", **BERT_LIKE, embedding_size=8,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    ),
    "electra": _seqcls(
        "ElectraForSequenceClassification", "ElectraConfig", **BERT_LIKE, embedding_size=8
    ),
    "deberta_v2": _seqcls(
        "DebertaV2ForSequenceClassification", "DebertaV2Config", **BERT_LIKE,
        relative_attention=True, position_buckets=4, max_relative_positions=8,
        pos_att_type=["p2c", "c2p"], pooler_hidden_size=16,
    ),
    "deberta": _seqcls(
        "DebertaForSequenceClassification", "DebertaConfig", **BERT_LIKE,
        relative_attention=True, max_relative_positions=8, pos_att_type=["p2c", "c2p"],
        pooler_hidden_size=16,
    ),
    "modernbert": _masked(
        "ModernBertForMaskedLM", "ModernBertConfig", vocab_size=VOCAB, hidden_size=16,
        intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=32, local_attention=4, global_attn_every_n_layers=2,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
        attention_dropout=0.1, embedding_dropout=0.1, mlp_dropout=0.1,
    ),
    "mobilebert": _masked(
        "MobileBertForMaskedLM", "MobileBertConfig", vocab_size=VOCAB, hidden_size=16,
        embedding_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        intra_bottleneck_size=8, true_hidden_size=8, num_feedforward_networks=2,
        max_position_embeddings=32,
    ),
    "funnel": _funnel,
    "big_bird": _big_bird,
    "big_bird_full": lambda b: _big_bird(b, "original_full"),
    "longformer": _longformer,
    "convbert": _seqcls(
        "ConvBertForSequenceClassification", "ConvBertConfig", **BERT_LIKE, embedding_size=16,
        head_ratio=2, conv_kernel_size=3,
    ),
    "squeezebert": _seqcls(
        "SqueezeBertForSequenceClassification", "SqueezeBertConfig", **BERT_LIKE,
        embedding_size=16, q_groups=2, k_groups=2, v_groups=2, post_attention_groups=2,
        intermediate_groups=2, output_groups=2,
    ),
    "mpnet": _masked("MPNetForMaskedLM", "MPNetConfig", **BERT_LIKE, pad_token_id=1),
    "roformer": _masked("RoFormerForMaskedLM", "RoFormerConfig", **BERT_LIKE, embedding_size=16),
    "ernie": _seqcls(
        "ErnieForSequenceClassification", "ErnieConfig", **BERT_LIKE, use_task_id=True,
        task_type_vocab_size=3,
    ),
    "esm": _masked(
        "EsmForMaskedLM", "EsmConfig", **BERT_LIKE, pad_token_id=1, mask_token_id=2,
        position_embedding_type="rotary", token_dropout=True,
    ),
    "nystromformer": _seqcls(
        "NystromformerForSequenceClassification", "NystromformerConfig", **BERT_LIKE,
        num_landmarks=4, segment_means_seq_len=8, conv_kernel_size=3, pad=False,
    ),
    "fnet": _seqcls(
        "FNetForSequenceClassification", "FNetConfig", **_NO_HEADS, pad=False,
        use_tpu_fourier_optimizations=False,
    ),
    "perceiver": _perceiver,
    "clip_text": _clip_text,
    "markuplm": _markuplm,
    "layoutlm": _layoutlm,
    "xmod": _xmod,
    "yoso": _seqcls("YosoForSequenceClassification", "YosoConfig", **BERT_LIKE, conv_window=3),
    # the suite's own builders, at this sweep's batch sizes
    "gpt2_suite": _suite("_gpt2"),
    "bert_suite": _suite("_bert"),
    "bart_suite": _suite("_bart"),
    # -------------------------------------------------------------------- encoder–decoders
    "pegasus": _seq2seq("PegasusForConditionalGeneration", "PegasusConfig"),
    "marian": _seq2seq("MarianMTModel", "MarianConfig", decoder_vocab_size=VOCAB),
    "mbart": _seq2seq("MBartForConditionalGeneration", "MBartConfig"),
    "m2m100": _seq2seq("M2M100ForConditionalGeneration", "M2M100Config", layerdrop=0.0),
    "led": _led,
    "whisper": _whisper,
    "umt5": _t5("UMT5ForConditionalGeneration", "UMT5Config"),  # a relative bias per layer
    "switch_transformers": _t5(
        "SwitchTransformersForConditionalGeneration", "SwitchTransformersConfig",
        num_sparse_encoder_layers=1, num_decoder_layers=2, num_sparse_decoder_layers=1,
        num_experts=4, expert_capacity=4, router_jitter_noise=0.1,
    ),
    "fsmt": _fsmt,
    "prophetnet": _prophetnet,
    "nllb_moe": _seq2seq(
        "NllbMoeForConditionalGeneration", "NllbMoeConfig", num_experts=4, expert_capacity=4,
        encoder_sparse_step=1, decoder_sparse_step=1,
        encoder_layerdrop=0.0, decoder_layerdrop=0.0,
    ),
    "speech_to_text": _speech_to_text,
    # ------------------------------------------------------------------------------- audio
    "whisper_encoder": _whisper_encoder,
    "hubert": _audio("HubertForSequenceClassification", "HubertConfig", **W2V_LIKE),
    "wavlm": _audio(
        "WavLMForSequenceClassification", "WavLMConfig", **W2V_LIKE, num_buckets=8,
        max_bucket_distance=16,
    ),
    "data2vec_audio": _audio(
        "Data2VecAudioForSequenceClassification", "Data2VecAudioConfig",
        **{**W2V_LIKE, "num_conv_pos_embeddings": 3},
    ),
    "wav2vec2": _audio(
        "Wav2Vec2ForSequenceClassification", "Wav2Vec2Config", **W2V_LIKE,
        do_stable_layer_norm=True, feat_extract_norm="layer", use_weighted_layer_sum=True,
        layerdrop=0.0,  # (dropping the one layer empties the weighted sum: transformers fails)
    ),
    "wav2vec2_conformer": _audio(
        "Wav2Vec2ConformerForSequenceClassification", "Wav2Vec2ConformerConfig", **W2V_LIKE,
        position_embeddings_type="relative", conv_depthwise_kernel_size=3,
    ),
    "sew_d": _audio(
        "SEWDForSequenceClassification", "SEWDConfig", **W2V_LIKE, squeeze_factor=2,
        max_position_embeddings=16, position_buckets=4,
    ),
    # ------------------------------------------------------------------------------ vision
    "clip_vision": _clip_vision,
    "convnext": _vision(
        "ConvNextForImageClassification", "ConvNextConfig", **_SMALL_STAGES, patch_size=2,
        num_stages=2, drop_path_rate=0.1,
    ),
    "convnextv2": _vision(
        "ConvNextV2ForImageClassification", "ConvNextV2Config", **_SMALL_STAGES, patch_size=2,
        num_stages=2, drop_path_rate=0.1,
    ),
    "resnet_hf": _vision(
        "ResNetForImageClassification", "ResNetConfig", **_SMALL_STAGES, embedding_size=8,
        layer_type="basic",
    ),
    "regnet": _vision(
        "RegNetForImageClassification", "RegNetConfig", **_SMALL_STAGES, embedding_size=8,
        groups_width=4,
    ),
    "mobilevit": _vision(
        "MobileViTForImageClassification", "MobileViTConfig", image_size=32, patch_size=2,
        hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 8, 8, 8, 8, 16],
        num_attention_heads=2, expand_ratio=2.0, size=32,
    ),
    "deit": _vision(
        "DeiTForImageClassification", "DeiTConfig", image_size=16, patch_size=4,
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
    ),
    "beit": _vision(
        "BeitForImageClassification", "BeitConfig", image_size=16, patch_size=4,
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        use_relative_position_bias=True, use_mean_pooling=True, drop_path_rate=0.1,
        vocab_size=VOCAB,
    ),
    "beit_shared_bias": _vision(
        "BeitForImageClassification", "BeitConfig", image_size=16, patch_size=4,
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        use_shared_relative_position_bias=True, use_mean_pooling=True, vocab_size=VOCAB,
    ),
    "segformer": _vision(
        "SegformerForImageClassification", "SegformerConfig", **_SMALL_STAGES,
        num_encoder_blocks=2, sr_ratios=[2, 1], patch_sizes=[3, 3], strides=[2, 2],
        num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=16,
        drop_path_rate=0.1,
    ),
    "dinov2": _vision(
        "Dinov2ForImageClassification", "Dinov2Config", image_size=16, patch_size=4,
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, drop_path_rate=0.1,
    ),
    "levit": _vision(
        "LevitForImageClassification", "LevitConfig", image_size=64, size=64, patch_size=16,
        hidden_sizes=[16, 16], num_attention_heads=[2, 2], depths=[1, 1], key_dim=[8, 8],
        drop_path_rate=0, mlp_ratio=[2, 2], attention_ratio=[2, 2],
        down_ops=[["Subsample", 8, 2, 4, 2, 2]],
    ),
    "swinv2": _vision(
        "Swinv2ForImageClassification", "Swinv2Config", image_size=16, patch_size=2,
        embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=4,
    ),
    "poolformer": _vision(
        "PoolFormerForImageClassification", "PoolFormerConfig", **_SMALL_STAGES,
        num_encoder_blocks=2, patch_sizes=[3, 3], strides=[2, 2], padding=[1, 1],
        mlp_ratio=2.0, drop_path_rate=0.1,
    ),
    "bit": _vision(
        "BitForImageClassification", "BitConfig", **_SMALL_STAGES, embedding_size=8,
        num_groups=4, layer_type="preactivation",
    ),
    "hiera": _vision(
        "HieraForImageClassification", "HieraConfig", image_size=[16, 16], patch_size=[3, 3],
        patch_stride=[2, 2], patch_padding=[1, 1], embed_dim=8, num_heads=[1, 2],
        depths=[1, 1], query_stride=[2, 2], masked_unit_size=[4, 4],
        masked_unit_attention=[True, False], embed_dim_multiplier=2.0, num_query_pool=1,
        drop_path_rate=0.1,
    ),
    "cvt": _vision(
        "CvtForImageClassification", "CvtConfig", embed_dim=[8, 16], num_heads=[1, 2],
        depth=[1, 2], patch_sizes=[3, 3], patch_stride=[2, 2], patch_padding=[1, 1],
        mlp_ratio=[2.0, 2.0], drop_rate=[0.1, 0.1], attention_drop_rate=[0.1, 0.1],
        drop_path_rate=[0.0, 0.1], qkv_bias=[True, True], cls_token=[False, True],
        qkv_projection_method=["dw_bn", "dw_bn"], kernel_qkv=[3, 3], padding_kv=[1, 1],
        stride_kv=[2, 2], padding_q=[1, 1], stride_q=[1, 1],
    ),
    "efficientnet": _vision(
        "EfficientNetForImageClassification", "EfficientNetConfig", image_size=32, size=32,
        width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128, dropout_rate=0.1,
        drop_connect_rate=0.1,
    ),
    "swin": _vision(  # depths [2, 1]: the second block of stage 1 shifts its windows
        "SwinForImageClassification", "SwinConfig", image_size=16, patch_size=2, embed_dim=8,
        depths=[2, 1], num_heads=[2, 2], window_size=4, use_absolute_embeddings=True,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, drop_path_rate=0.1,
    ),
    "focalnet": _vision(
        "FocalNetForImageClassification", "FocalNetConfig", image_size=16, patch_size=2,
        embed_dim=8, hidden_sizes=[8, 16], depths=[1, 1], focal_levels=[2, 2],
        focal_windows=[3, 3], use_layerscale=True, use_post_layernorm_in_modulation=True,
        normalize_modulator=True, drop_path_rate=0.1, hidden_dropout_prob=0.1,
    ),
    "pvt_v2": _vision(
        "PvtV2ForImageClassification", "PvtV2Config", **_SMALL_STAGES, image_size=16,
        num_encoder_blocks=2, sr_ratios=[2, 1], patch_sizes=[3, 3], strides=[2, 2],
        num_attention_heads=[1, 2], mlp_ratios=[2, 2], linear_attention=True,
        drop_path_rate=0.1, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    ),
    "mobilenet_v2": _vision(
        "MobileNetV2ForImageClassification", "MobileNetV2Config", image_size=32, size=32,
        depth_multiplier=0.25, min_depth=4, classifier_dropout_prob=0.1,
    ),
    "mobilevitv2": _vision(
        "MobileViTV2ForImageClassification", "MobileViTV2Config", image_size=64, size=64,
        width_multiplier=0.25, n_attn_blocks=[1, 1, 1], attn_dropout=0.1, ffn_dropout=0.1,
    ),
    "vit_mae": _vit_mae,
    "yolos": _yolos,
    "timesformer": _video(
        "TimesformerForVideoClassification", "TimesformerConfig", frames=2, image_size=16,
        patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    ),  # (no drop_path_rate: transformers 5.25 types it as an int)
    "vivit": _video(
        "VivitForVideoClassification", "VivitConfig", frames=4, image_size=16,
        tubelet_size=[2, 4, 4], hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    ),
    # ------------------------------------------------------------------------- time series
    "patchtst": _forecast(
        "PatchTSTForPrediction", "PatchTSTConfig", patch_length=4, patch_stride=4,
        num_hidden_layers=2, d_model=16, num_attention_heads=2, ffn_dim=32,
        channel_attention=True, positional_encoding_type="random", norm_type="layernorm",
        attention_dropout=0.1, positional_dropout=0.1, path_dropout=0.1,
        ff_dropout=0.1, head_dropout=0.1,
    ),
    "patchtsmixer": _forecast(
        "PatchTSMixerForPrediction", "PatchTSMixerConfig", patch_length=4, patch_stride=4,
        d_model=8, num_layers=2, mode="mix_channel", self_attn=True, self_attn_heads=2,
        use_positional_encoding=True, positional_encoding_type="random", dropout=0.1,
        head_dropout=0.1,
    ),
    "informer": _probabilistic(  # ProbSparse attention (distil=True: a BatchNorm conv)
        "InformerForPrediction", "InformerConfig", encoder_layers=2, sampling_factor=2,
        distil=False,
    ),
}  # fmt: skip


# ---------------------------------------------------------------------------------- checking
@dataclass
class Row:
    """One (model at a batch size, layout) result."""

    model: str  # NAME, or NAME@bN at batch N
    layout: str
    outcome: str = ""
    seconds: float = 0.0
    worst: dict[str, float] = field(default_factory=dict)  # error kind → worst over the steps
    first_wrong_step: int | None = None
    float32_parts: list[str] = field(default_factory=list)
    route_warnings: list[str] = field(default_factory=list)
    error: dict[str, str] = field(default_factory=dict)  # CRASH / REFUSED: what was raised
    names_module: bool | None = None  # REFUSED: whether the message names a module path
    alone: str = ""  # a flagged row, again with the JDOptimizer alone, then the Engine alone
    message: str = ""  # BUILD / TIMEOUT / SKIPPED
    traceback: str = ""

    @property
    def flagged(self) -> bool:
        """WRONG, CRASH, or REFUSED without a module path in the message."""
        return self.outcome in ("WRONG", "CRASH") or (
            self.outcome == "REFUSED" and not self.names_module
        )


@dataclass
class Where:
    """The phase and step running, for the report of an exception."""

    phase: str = "build"
    step: int = 0

    def __str__(self) -> str:
        return f"{self.phase}, step {self.step}" if self.step else f"{self.phase}, setup"


class SweepTimeout(BaseException):
    """A layout ran past its time limit (a BaseException, so that no ``except`` catches it)."""


def label(name: str, b: int) -> str:
    """``NAME`` at the default batch, ``NAME@bN`` at batch N."""
    return name if b == DEFAULT_BATCH else f"{name}@b{b}"


def parse_label(text: str) -> tuple[str, int | None]:
    """``'distilbert@b4'`` → ``('distilbert', 4)``; no ``@bN``: batch ``None``."""
    name, _, batch = text.partition("@b")
    return name, int(batch) if batch else None


def build(name: str, b: int) -> Built:
    """The model (float64, train mode) and its forward to ``[b, 2]`` losses, seeded."""
    torch.manual_seed(0)
    model, run = MODELS[name](b)
    return model.double().train(), run


def trainable(model: nn.Module) -> list[Tensor]:
    """The parameters that require grad, in ``model.parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def flat_grads(params: list[Tensor]) -> Tensor:
    """The parameters' ``.grad`` (zeros where None), flattened and concatenated."""
    return torch.cat(
        [(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params]
    )


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """Max absolute difference over the max of ``|expected|``."""
    scale = expected.abs().max().clamp_min(1e-300)
    return ((actual.double() - expected.double()).abs().max() / scale).item()


class Float32Watch(torch.overrides.TorchFunctionMode):
    """Notes the torch functions that return a lower-precision float tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Collection[type],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, Tensor) and t.dtype in (torch.float32, torch.float16, torch.bfloat16):
                self.seen.add(getattr(func, "__name__", str(func)))
        return out


def bare_check(name: str, b: int) -> tuple[str | None, list[str]]:
    """Whether the model builds, runs and differentiates without jdoptim (None, or the error),
    and the torch functions it computes in float32."""
    try:
        model, run = build(name, b)
        watch = Float32Watch()
        with watch:
            run(model)
        losses = run(model)
        assert losses.shape == (b, 2), f"losses of shape {tuple(losses.shape)}"
        assert losses.dtype == torch.float64, f"losses of dtype {losses.dtype}"
        assert losses.isfinite().all(), "non-finite losses in float64"
        explicit_jacobian(losses[:, 0], trainable(model))
    except Exception as err:
        return f"{type(err).__name__}: {str(err)[:300]}", []
    return None, sorted(watch.seen)


def step_errors(
    engine: Engine | None, opt: JDOptimizer | None, losses: Tensor, params: list[Tensor]
) -> dict[str, float]:
    """One step's errors: the Engine's Gramian; the JDOptimizer's Gramian, weights and .grad."""
    jacobian = explicit_jacobian(losses, params)
    expected = jacobian @ jacobian.T
    out: dict[str, float] = {}
    if engine is not None:
        gramian = engine.compute_gramian(losses, retain_graph=opt is not None)
        out["engine_gramian"] = relative_error(as_square(gramian, losses.shape), expected)
    if opt is not None:
        opt.zero_grad()
        record = opt.step(losses)
        if record.gramian is None or record.weights is None:
            out["record"] = float("nan")
            return out
        weights = record.weights.reshape(-1).double()
        out["opt_gramian"] = relative_error(record.gramian, expected)
        oracle = UPGradWeighting()(expected)
        out["weights"] = (weights - oracle).abs().max().item()
        out["update"] = relative_error(jacobian.T @ weights, jacobian.T @ oracle)
        out["grad"] = relative_error(flat_grads(params), jacobian.T @ weights)
    return out


def _optimizer(model: nn.Module, batch_dim: int | None, low_memory: bool) -> JDOptimizer:
    sgd = torch.optim.SGD(trainable(model), lr=0.0)
    return JDOptimizer(
        sgd, UPGrad(), modules=model, batch_dim=batch_dim, scope="all", low_memory=low_memory
    )


def run_layout(name: str, b: int, layout: str, where: Where, alone: bool) -> list[dict[str, float]]:
    """Per step, the errors of :func:`step_errors`: an Engine and a JDOptimizer on one model,
    or (``alone``, and always for low memory) the JDOptimizer alone, then the Engine alone on
    a fresh build."""
    pick, batch_dim, low_memory = LAYOUTS[layout]
    errors: list[dict[str, float]] = []
    model, run = build(name, b)
    if not (alone or low_memory):
        where.phase = "Engine + JDOptimizer on one model"
        opt = _optimizer(model, batch_dim, low_memory)
        with Engine(model, batch_dim=batch_dim) as engine:
            for step in range(1, STEPS + 1):
                where.step = step
                errors.append(step_errors(engine, opt, pick(run(model)), trainable(model)))
        return errors
    where.phase = "JDOptimizer alone"
    opt = _optimizer(model, batch_dim, low_memory)
    for step in range(1, STEPS + 1):
        where.step = step
        errors.append(step_errors(None, opt, pick(run(model)), trainable(model)))
    del opt
    model, run = build(name, b)
    where.phase, where.step = "Engine alone", 0
    with Engine(model, batch_dim=batch_dim, low_memory=low_memory) as engine:
        for step in range(1, STEPS + 1):
            where.step = step
            errors[step - 1].update(step_errors(engine, None, pick(run(model)), trainable(model)))
    return errors


def _tolerance(kind: str) -> float:
    return {"weights": float("inf"), "update": WEIGHTS_TOL}.get(kind, TOL)


def grade(row: Row, errors: list[dict[str, float]]) -> None:
    """Sets the row's worst errors and its outcome: EXACT, F32 or WRONG."""
    for step in errors:
        for kind, value in step.items():
            worst = row.worst.get(kind, 0.0)
            row.worst[kind] = max(worst, value) if value == value else float("nan")
    bad = [v for k, v in row.worst.items() if not v < _tolerance(k)]
    if not bad:
        row.outcome = "EXACT"
    elif row.float32_parts and all(v < F32_TOL for v in bad):
        row.outcome = "F32"
    else:
        row.outcome = "WRONG"
        row.first_wrong_step = 1 + next(
            i
            for i, step in enumerate(errors)
            if any(not v < _tolerance(k) for k, v in step.items())
        )


def _module_paths(name: str, b: int) -> list[str]:
    try:
        return [path for path, _ in build(name, b)[0].named_modules() if path]
    except Exception:
        return []


def _named_module(message: str, paths: list[str]) -> str:
    named = [p for p in paths if f"'{p}'" in message or f"`{p}`" in message]
    named = named or [p for p in paths if "." in p and p in message]
    return max(named, key=len) if named else ""


def classify(row: Row, err: Exception, name: str, b: int, where: Where) -> None:
    """Sets a row's outcome from an exception: REFUSED for a ``raise`` in jdoptim, else CRASH."""
    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if f.filename.startswith(f"{JDOPTIM_DIR}{os.sep}")]
    last = frames[-1] if frames else None
    row.error = {"type": type(err).__name__, "message": str(err)[:300], "where": str(where)}
    if ours:
        where_in = Path(ours[-1].filename).relative_to(JDOPTIM_DIR.parent)
        row.error["jdoptim_frame"] = f"{where_in}:{ours[-1].lineno} in {ours[-1].name}"
    in_jdoptim = bool(ours) and ours[-1] is last
    if last is not None and in_jdoptim and (last.line or "").lstrip().startswith("raise"):
        row.outcome = "REFUSED"
        named = _named_module(str(err), _module_paths(name, b))
        row.names_module, row.error["named"] = bool(named), named
        return
    row.outcome = "CRASH"
    if last is not None:
        row.error["raised_at"] = f"{last.filename}:{last.lineno} in {last.name}"
    row.error["crash_kind"] = (
        "a torch call in jdoptim's code"
        if in_jdoptim
        else "torch/transformers code under a jdoptim call"
        if ours
        else "the model's forward, with jdoptim's hooks on"
    )
    row.traceback = "".join(traceback.format_exception(err))[-3000:]


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raises :class:`SweepTimeout` in the block after ``seconds`` (SIGALRM)."""

    def alarm(signum: int, frame: FrameType | None) -> None:
        raise SweepTimeout

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(max(1, int(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check(
    name: str, b: int, layout: str, timeout: float, f32: list[str], alone: bool = False
) -> Row:
    """One row: the layout's steps run and graded, or the exception classified."""
    row = Row(label(name, b), layout, float32_parts=f32)
    where = Where()
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", EngineRouteWarning)
        try:
            with time_limit(timeout):
                errors = run_layout(name, b, layout, where, alone)
            grade(row, errors)
        except SweepTimeout:
            row.outcome, row.message = "TIMEOUT", f"over {int(timeout)} s ({where})"
        except Exception as err:
            classify(row, err, name, b, where)
    messages = {str(w.message) for w in caught if issubclass(w.category, EngineRouteWarning)}
    row.route_warnings = sorted(messages)
    row.seconds = round(time.perf_counter() - start, 1)
    return row


def sweep_model(name: str, b: int, layouts: list[str]) -> list[Row]:
    """The model's rows at batch ``b``; a flagged row is run again with each engine alone."""
    start = time.perf_counter()
    problem, f32 = bare_check(name, b)
    if problem:
        return [Row(label(name, b), "-", "BUILD", message=problem)]
    rows = []
    for layout in layouts:
        left = MODEL_BUDGET - (time.perf_counter() - start)
        if left < 5:
            message = f"the model's {MODEL_BUDGET} s are spent"
            rows.append(Row(label(name, b), layout, "SKIPPED", message=message))
            continue
        row = check(name, b, layout, min(LAYOUT_TIMEOUT, left), f32)
        if row.flagged and not LAYOUTS[layout][2]:
            left = max(5.0, MODEL_BUDGET - (time.perf_counter() - start))
            again = check(name, b, layout, min(LAYOUT_TIMEOUT, left), f32, alone=True)
            row.alone = f"{again.outcome}: {detail(again)[:300]}"
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ report
def detail(row: Row) -> str:
    """A row's errors, or what was raised, on one line."""
    if row.outcome in ("EXACT", "F32", "WRONG"):
        text = ", ".join(f"{k} {v:.1e}" for k, v in row.worst.items())
        if row.outcome == "F32":
            text = f"float32 parts ({', '.join(row.float32_parts[:4])}); {text}"
        if row.outcome == "WRONG":
            text = f"first wrong at step {row.first_wrong_step}; {text}"
        if row.route_warnings:
            text += f"; route warnings: {len(row.route_warnings)}"
    elif row.outcome in ("REFUSED", "CRASH"):
        e = row.error
        text = f"{e['type']}: {e['message']} [at: {e['where']}]"
        if row.outcome == "REFUSED":
            named = f" '{e['named']}'" if e.get("named") else ""
            text += f" [names a module: {row.names_module}{named}]"
        if e.get("jdoptim_frame"):
            text += f" [jdoptim frame: {e['jdoptim_frame']}]"
        if row.outcome == "CRASH":
            text += f" [raised at: {e.get('raised_at', '?')}; in {e['crash_kind']}]"
    else:
        text = row.message
    if row.alone:
        text += f" [JDOptimizer alone, then Engine alone: {row.alone}]"
    return text


def rerun_command(row: Row) -> str:
    """The command that runs this row alone."""
    return (
        "OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python benchmarks/model_zoo.py "
        f"--only {row.model} --layout {row.layout}"
    )


def counts_line(rows: list[Row]) -> str:
    """``N models × batch sizes, M rows: EXACT …, F32 …, …``."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.outcome] = counts.get(row.outcome, 0) + 1
    refused = [r for r in rows if r.outcome == "REFUSED"]
    unnamed = sum(1 for r in refused if not r.names_module)
    order = ["EXACT", "F32", "WRONG", "CRASH", "REFUSED", "BUILD", "TIMEOUT", "SKIPPED"]
    parts = [f"{k} {counts[k]}" for k in order if k in counts]
    if refused:
        parts[[k for k in order if k in counts].index("REFUSED")] += (
            f" ({unnamed} without a module path)"
        )
    return f"{len({r.model for r in rows})} models × batch sizes, {len(rows)} rows: " + ", ".join(
        parts
    )


def _cell(text: str, limit: int) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:limit]


def tree_state() -> str:
    """The repository's commit, and whether its tree has uncommitted changes."""
    try:
        git = ["git", "-C", str(REPO)]
        commit = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"
    return f"commit {commit}" + (" with uncommitted changes" if dirty else ", clean tree")


def _summary(rows: list[Row]) -> list[str]:
    lines = ["## WRONG, CRASH, and REFUSED without a module path", ""]
    order = {"WRONG": 0, "CRASH": 1, "REFUSED": 2}
    flagged = sorted((r for r in rows if r.flagged), key=lambda r: order[r.outcome])
    for row in flagged:
        lines.append(
            f"- **{row.outcome}** `{row.model}` / `{row.layout}`: {_cell(detail(row), 800)}"
        )
        lines.append(f"  - rerun: `{rerun_command(row)}`")
    lines += [] if flagged else ["(none)"]
    lines += ["", "## F32: within 1e-6 in models with float32 internals", ""]
    f32 = [r for r in rows if r.outcome == "F32"]
    lines += [f"- `{r.model}` / `{r.layout}`: {_cell(detail(r), 400)}" for r in f32]
    lines += [] if f32 else ["(none)"]
    unchecked = [r for r in rows if r.outcome in ("BUILD", "TIMEOUT", "SKIPPED")]
    if unchecked:
        lines += ["", "## Not checked", ""]
        lines += [
            f"- `{r.model}` / `{r.layout}` {r.outcome}: {_cell(r.message, 300)}" for r in unchecked
        ]
    return lines


def report(rows: list[Row], seconds: float) -> str:
    """The Markdown report: setup, counts, the summary, then a table of every row."""
    lines = [
        "# jdoptim model zoo",
        "",
        f"`benchmarks/model_zoo.py` at {tree_state()}; transformers {T.__version__}, torch "
        f"{torch.__version__}; {seconds / 60:.1f} min. Float64, train mode with default dropout, "
        f"{STEPS} steps per layout, each checked against the explicit Jacobian (tolerance "
        f"{TOL:g} relative on Gramians and `.grad`, {WEIGHTS_TOL:g} absolute on UPGrad weights). "
        "`NAME@bN`: batch N (default 3). See the module docstring for the setup and outcomes.",
        "",
        counts_line(rows),
        "",
        *_summary(rows),
        "",
        "## Every row",
        "",
        "| model | layout | outcome | s | errors / message |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.layout} | {r.outcome} | {r.seconds} | {_cell(detail(r), 600)} |"
        )
    warned = [(r, w) for r in rows for w in r.route_warnings]
    if warned:
        lines += ["", "## EngineRouteWarning texts", ""]
        lines += [f"- `{r.model}` / `{r.layout}`: {_cell(w, 500)}" for r, w in warned]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------- main
def _plan(only: str | None, batches: list[int]) -> list[tuple[str, int]]:
    """(name, batch) pairs, batch-major; ``NAME@bN`` in ``only`` runs at batch N only."""
    plan: list[tuple[str, int]] = []
    for text in only.split(",") if only else list(MODELS):
        name, batch = parse_label(text.strip())
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; --list prints the names")
        plan += [(name, b) for b in ([batch] if batch else batches) if (name, b) not in plan]
    return sorted(plan, key=lambda p: batches.index(p[1]) if p[1] in batches else len(batches))


def _layouts(layout: str | None) -> list[str]:
    if layout is None:
        return list(LAYOUTS)
    layout = layout.replace("-", "_")
    if layout not in LAYOUTS:
        raise SystemExit(f"unknown layout {layout!r}: one of {', '.join(LAYOUTS)}")
    return [layout]


def print_row(row: Row, width: int, tracebacks: bool) -> None:
    """A row on one line (its model's name in ``width`` columns), and its traceback if asked."""
    print(f"{row.model:{width}} {row.layout:18} {row.outcome:8} {row.seconds:6}s  "
          f"{detail(row)[:400]}", flush=True)  # fmt: skip
    if tracebacks and row.traceback:
        print(row.traceback)


def main() -> None:
    """Parses the arguments, sweeps, prints a line per row and the counts, writes ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--only", help="NAME or NAME@bN, comma-separated (default: every model)")
    parser.add_argument("--layout", help=" | ".join(LAYOUTS) + " (default: all four)")
    parser.add_argument("--batches", default=str(DEFAULT_BATCH), help="comma-separated, e.g. 3,4,8")
    parser.add_argument("--out", type=Path, help="write the Markdown report there")
    parser.add_argument("--traceback", action="store_true", help="print CRASH tracebacks")
    parser.add_argument("--list", action="store_true", help="print the model names")
    args = parser.parse_args()
    if args.list:
        print("\n".join(MODELS))
        return
    torch.set_num_threads(1)
    T.logging.set_verbosity_error()
    batches = [int(x) for x in args.batches.split(",")]
    layouts = _layouts(args.layout)
    start = time.perf_counter()
    rows: list[Row] = []
    for name, b in _plan(args.only, batches):
        for row in sweep_model(name, b, layouts):
            rows.append(row)
            print_row(row, 18, args.traceback)
    if args.out:
        args.out.write_text(report(rows, time.perf_counter() - start))
    print(counts_line(rows))


if __name__ == "__main__":
    main()
