"""The Gramian engine on real model code, against the explicit Jacobian of the same losses.

Models: transformers' DeBERTa-v2 (relative position embeddings read by the encoder and
repeated along the batch: a region shared by the samples), Perceiver (latents and position
encodings expanded to an int batch size inside a call), GPT-2 (tied head, default forward,
dropout 0.1 in train mode; also with peft's LoRA on its ``Conv1D`` projections), BERT (padding
mask, default dropout), DistilBERT,
MPNet (a relative attention bias expanded along the batch before its addition), Llama (RMSNorm,
rotary, grouped-query attention; also with activation checkpointing, and with peft's LoRA and
DoRA adapters), OPT (its MLP on ``[b·s, d]`` token rows, read as ``s`` rows per sample), BART (a
decoder position embedding ``[1, s, d]`` computed from the batch's token ids), T5
(encoder–decoder, relative attention bias), ViT (class token, position embedding), Swin (window
attention, a relative position bias added to the windows' scores) and wav2vec2
(convolutional feature encoder, weight-normed convolutional position embedding), built from tiny
random-init configs (no downloads); ``nn.TransformerEncoderLayer`` with its default dropout; a
nanoGPT-style model and a ResNet-style CNN with GroupNorm (and a depthwise block)
from :mod:`tests.models`.

Each model gives two losses per sample, ``[b, 2]``; three loss layouts are checked: per-sample
(``[b]``, ``batch_dim=0``), ``[batch, tasks]`` (``batch_dim=0``) and two task losses (the batch
means, ``batch_dim=None``), each over three forwards (train mode, dropout active, float64: the
structure's first step, which the engine checks, then two on the route it remembered, where
shared calls are expanded), with an ``Engine`` and a ``JDOptimizer`` hooked on the same model.
For each step: the engine's Gramian equals ``J Jᵀ`` of the explicit Jacobian ``J`` (one
``autograd.grad`` per loss on the same graph, so the same dropout masks), and one step of
``JDOptimizer(modules=model)`` with UPGrad leaves ``.grad = Jᵀ w`` with ``w`` the UPGrad weights
of that explicit Gramian.

GPT-2's and BERT's position embeddings (``[1, s, d]``) and nanoGPT's (``[t, d]``), shared by the
samples, are expanded along the batch by the engine, and T5's relative attention bias and
Swin's relative position bias are read at the additions that give them to the samples, so these
models raise no ``EngineRouteWarning`` (an error in the suite); nor does
``nn.TransformerEncoderLayer`` with its default dropout, whose attention goes through the
``MultiheadAttention`` rule; nor do DeBERTa-v2 and Perceiver. (For the other models the
warning is ignored: the results are what is checked.)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGrad, UPGradWeighting
from jdoptim.autogram import Engine
from tests.models import NanoGPT, ResNetGN

from ._oracle import as_square, explicit_jacobian

transformers = pytest.importorskip("transformers")
#: models whose every layout is exact on the fast path (no EngineRouteWarning)
NO_ROUTE_WARNING = {
    "gpt2",
    "bert",
    "distilbert",
    "mpnet",
    "opt",
    "bart",
    "swin",
    "t5",
    "llama_dora",
    "wav2vec2",
    "nanogpt",
    "nanogpt_batch_is_seq",
    "transformer_encoder_layer",
    "deberta_v2",
    "perceiver",
    "longformer",
    "led",
}
_IGNORE_ROUTE = pytest.mark.filterwarnings("ignore::jdoptim.autogram.EngineRouteWarning")

VOCAB = 40
Run = Callable[[nn.Module], Tensor]  # model → [b, 2] losses


def _lm_losses(logits: Tensor, tokens: Tensor) -> Tensor:
    """Per-sample next-token cross-entropy and a second per-sample loss on the last position."""
    b, s, v = logits.shape
    ce = F.cross_entropy(
        logits[:, :-1].reshape(-1, v), tokens[:, 1:].reshape(-1), reduction="none"
    ).view(b, s - 1)
    return torch.stack([ce.mean(1), logits[:, -1].tanh().pow(2).mean(-1)], dim=1)


def _class_losses(logits: Tensor, labels: Tensor) -> Tensor:
    ce = F.cross_entropy(logits, labels, reduction="none")
    return torch.stack([ce, logits.sin().sum(-1)], dim=1)


def _gpt2(batch: int = 4, seq: int = 8) -> tuple[nn.Module, Run]:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2
    )  # resid/embd/attn dropout: the default 0.1
    model = transformers.GPT2LMHeadModel(config)
    tokens = torch.randint(0, VOCAB, (batch, seq))
    return model, lambda m: _lm_losses(m(tokens).logits, tokens)


def _bert(batch: int = 4, seq: int = 8) -> tuple[nn.Module, Run]:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
    )  # hidden and attention dropout: the default 0.1
    model = transformers.BertForSequenceClassification(config)
    tokens = torch.randint(1, VOCAB, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, 5:], mask[2, 3:] = 0, 0  # padding
    tokens[mask == 0] = 0
    labels = torch.randint(0, 3, (batch,))
    run = lambda m: _class_losses(m(input_ids=tokens, attention_mask=mask).logits, labels)  # noqa: E731
    return model, run


def _llama(batch: int = 4, seq: int = 8) -> tuple[nn.Module, Run]:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(config)
    tokens = torch.randint(0, VOCAB, (batch, seq))
    return model, lambda m: _lm_losses(m(tokens).logits, tokens)


def _llama_checkpointed(reentrant: bool = False) -> tuple[nn.Module, Run]:
    """Llama with activation checkpointing: its layers' forward runs again in the backward
    (``reentrant``: torch's older form, which ``autograd.grad`` cannot go through)."""
    model, run = _llama()
    kwargs = {"use_reentrant": reentrant}
    with warnings.catch_warnings():  # (transformers 5 renames it activation_checkpointing_enable)
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model, run


def _peft(base: Callable[[], tuple[nn.Module, Run]], **lora: object) -> tuple[nn.Module, Run]:
    """``base`` with peft adapters: only the adapters' parameters train. LoRA's ``B`` starts at
    zero, which leaves ``A`` without gradient: it is drawn at random here, so that every
    adapter parameter has rows to check."""
    peft = pytest.importorskip("peft")
    model, run = base()
    with warnings.catch_warnings():  # (transformers 5 deprecations peft still calls)
        warnings.simplefilter("ignore", FutureWarning)
        adapted = peft.get_peft_model(model, peft.LoraConfig(r=4, **lora))
    for name, param in adapted.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.3)
    return adapted, run


def _llama_lora() -> tuple[nn.Module, Run]:
    """LoRA (dropout 0.1) on Llama's attention and MLP projections: each adapter is a pair of
    ``Linear`` layers beside the frozen one."""
    targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
    return _peft(_llama, target_modules=targets, lora_dropout=0.1)


def _llama_dora() -> tuple[nn.Module, Run]:
    """DoRA: a magnitude module whose forward calls the LoRA layers (handed to it, not its
    children) and reads their weights directly."""
    return _peft(_llama, target_modules=["q_proj", "v_proj"], lora_dropout=0.1, use_dora=True)


def _gpt2_lora() -> tuple[nn.Module, Run]:
    """LoRA on GPT-2's ``Conv1D`` projections (weights stored ``[in, out]``)."""
    targets = ["c_attn", "c_proj"]
    return _peft(_gpt2, target_modules=targets, lora_dropout=0.1, fan_in_fan_out=True)


def _opt(batch: int = 4, seq: int = 8) -> tuple[nn.Module, Run]:
    """OPT runs its MLP on ``hidden.reshape(-1, d)``: ``b·s`` token rows, sample-major."""
    config = transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        ffn_dim=32,
        max_position_embeddings=32,
        word_embed_proj_dim=16,
    )  # dropout: the default 0.1
    model = transformers.OPTForCausalLM(config)
    tokens = torch.randint(1, VOCAB, (batch, seq))
    return model, lambda m: _lm_losses(m(tokens).logits, tokens)


def _bart(batch: int = 4, seq: int = 8) -> tuple[nn.Module, Run]:
    """BART: its decoder position embedding takes the ``[b, s]`` token ids (for their shape) and
    returns ``[1, s, d]``, shared by the samples."""
    config = transformers.BartConfig(
        vocab_size=VOCAB,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=32,
        num_labels=3,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
    )  # dropout: the default 0.1
    model = transformers.BartForSequenceClassification(config)
    tokens = torch.randint(3, VOCAB, (batch, seq))
    tokens[:, -1] = 2  # the classification head reads the eos position
    labels = torch.randint(0, 3, (batch,))
    return model, lambda m: _class_losses(m(input_ids=tokens).logits, labels)


def _t5(batch: int = 4, seq: int = 6) -> tuple[nn.Module, Run]:
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        relative_attention_max_distance=16,
        decoder_start_token_id=0,
        pad_token_id=0,
    )  # dropout_rate: the default 0.1
    model = transformers.T5ForConditionalGeneration(config)
    source = torch.randint(1, VOCAB, (batch, seq))
    target = torch.randint(1, VOCAB, (batch, seq - 1))

    def run(m: nn.Module) -> Tensor:
        logits = m(input_ids=source, labels=target).logits  # [b, s, V]
        ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(1)
        return torch.stack([ce, logits[:, 0].tanh().pow(2).mean(-1)], dim=1)

    return model, run


def _vit(batch: int = 4) -> tuple[nn.Module, Run]:
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    model = transformers.ViTForImageClassification(config)
    images = torch.randn(batch, 3, 8, 8, dtype=torch.float64)
    labels = torch.randint(0, 3, (batch,))
    return model, lambda m: _class_losses(m(pixel_values=images).logits, labels)


def _wav2vec2(batch: int = 4) -> tuple[nn.Module, Run]:
    """wav2vec2: a convolutional feature encoder (GroupNorm) and a convolutional position
    embedding under ``torch.nn.utils.weight_norm`` (its weight computed in the forward)."""
    config = transformers.Wav2Vec2Config(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8, 8),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2,
        mask_time_prob=0.0,
        classifier_proj_size=8,
        num_labels=3,
    )  # hidden, attention and feature-projection dropout: the default 0.1
    model = transformers.Wav2Vec2ForSequenceClassification(config)
    audio = torch.randn(batch, 400, dtype=torch.float64)
    labels = torch.randint(0, 3, (batch,))
    return model, lambda m: _class_losses(m(input_values=audio).logits, labels)


def _swin(batch: int = 4) -> tuple[nn.Module, Run]:
    """Swin: window attention on ``[b·windows, …]`` (the samples folded with their windows) and
    a relative position bias ``[1, heads, N, N]``, shared by the samples, added to the scores of
    every window."""
    config = transformers.SwinConfig(
        image_size=16,
        patch_size=2,
        embed_dim=8,
        depths=[1, 1],
        num_heads=[2, 2],
        window_size=4,
        num_labels=3,
    )  # (drop path, attention and hidden dropout: the default 0.0 / 0.1)
    model = transformers.SwinForImageClassification(config)
    images = torch.randn(batch, 3, 16, 16, dtype=torch.float64)
    labels = torch.randint(0, 3, (batch,))
    return model, lambda m: _class_losses(m(pixel_values=images).logits, labels)


class _EncoderClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 16)
        self.encoder = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)  # dropout 0.1
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


def _distilbert(batch: int = 3, seq: int = 8) -> tuple[nn.Module, Run]:
    config = transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, hidden_dim=32, num_labels=3
    )  # dropout and attention dropout: the default 0.1
    model = transformers.DistilBertForSequenceClassification(config)
    tokens = torch.randint(0, VOCAB, (batch, seq))
    labels = torch.randint(0, 3, (batch,))
    return model, lambda m: _class_losses(m(input_ids=tokens).logits, labels)


def _deberta_v2(batch: int = 3, seq: int = 8) -> tuple[nn.Module, Run]:
    config = transformers.DebertaV2Config(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        relative_attention=True,
        position_buckets=4,
        max_relative_positions=8,
        pos_att_type=["p2c", "c2p"],
        pooler_hidden_size=16,
        num_labels=3,
    )  # rel_embeddings.weight read by the encoder, repeated along the batch in every layer
    model = transformers.DebertaV2ForSequenceClassification(config)
    tokens = torch.randint(0, VOCAB, (batch, seq))
    labels = torch.randint(0, 3, (batch,))
    return model, lambda m: _class_losses(m(input_ids=tokens).logits, labels)


def _perceiver(batch: int = 3, seq: int = 8) -> tuple[nn.Module, Run]:
    config = transformers.PerceiverConfig(
        num_latents=4,
        d_latents=16,
        d_model=16,
        num_blocks=1,
        num_self_attends_per_block=1,
        num_self_attention_heads=2,
        num_cross_attention_heads=1,
        vocab_size=VOCAB,
        max_position_embeddings=16,
        num_labels=3,
        qk_channels=8,
        v_channels=16,
    )  # latents and position encodings: parameters expanded to an int batch size in a call
    model = transformers.PerceiverForSequenceClassification(config)
    tokens = torch.randint(0, VOCAB, (batch, seq))
    labels = torch.randint(0, 3, (batch,))
    return model, lambda m: _class_losses(m(inputs=tokens).logits, labels)


def _longformer(batch: int = 4, seq: int = 8) -> tuple[nn.Module, Run]:
    """Longformer: its self-attention transposes the ``[b, s, d]`` states to ``[s, b, d]`` and
    projects them there (its global query projection on ``[1, b, d]``, one global token, divided
    in place), inside a batch-first model; at ``s = 2b`` the ``[s, b, d]`` outputs also look like
    samples folded by two along dimension 0."""
    config = transformers.LongformerConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        attention_window=[4, 4],
        num_labels=3,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )  # dropout: the default 0.1
    model = transformers.LongformerForSequenceClassification(config)
    tokens = torch.randint(3, VOCAB, (batch, seq))
    labels = torch.randint(0, 3, (batch,))
    return model, lambda m: _class_losses(m(input_ids=tokens).logits, labels)


def _led(batch: int = 3, seq: int = 8) -> tuple[nn.Module, Run]:
    """LED: Longformer's self-attention in a BART-style encoder."""
    config = transformers.LEDConfig(
        vocab_size=VOCAB,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_encoder_position_embeddings=32,
        max_decoder_position_embeddings=32,
        attention_window=[4],
        num_labels=3,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    model = transformers.LEDForConditionalGeneration(config)
    source, target = torch.randint(3, VOCAB, (batch, seq)), torch.randint(3, VOCAB, (batch, 6))
    return model, lambda m: _lm_losses(m(input_ids=source, decoder_input_ids=target).logits, target)


def _mpnet(batch: int = 3, seq: int = 8) -> tuple[nn.Module, Run]:
    config = transformers.MPNetConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=3,
    )  # its relative attention bias [1, heads, q, k] is expanded along the batch, then added
    model = transformers.MPNetForSequenceClassification(config)
    tokens = torch.randint(2, VOCAB, (batch, seq))
    labels = torch.randint(0, 3, (batch,))
    return model, lambda m: _class_losses(m(input_ids=tokens).logits, labels)


def _encoder_layer(batch: int = 4) -> tuple[nn.Module, Run]:
    x = torch.randn(batch, 6, 5, dtype=torch.float64)
    labels = torch.randint(0, 3, (batch,))
    return _EncoderClassifier(), lambda m: _class_losses(m(x), labels)


def _nanogpt(batch: int = 4, seq: int = 8) -> tuple[nn.Module, Run]:
    tokens = torch.randint(0, VOCAB, (batch, seq))
    return NanoGPT(vocab=VOCAB, block=16), lambda m: _lm_losses(m(tokens), tokens)


def _resnet(batch: int = 4) -> tuple[nn.Module, Run]:
    images = torch.randn(batch, 3, 8, 8, dtype=torch.float64)
    labels = torch.randint(0, 3, (batch,))
    model = ResNetGN(widths=(8, 16), blocks=(1, 1), depthwise=True)
    return model, lambda m: _class_losses(m(images), labels)


MODELS: dict[str, Callable[[], tuple[nn.Module, Run]]] = {
    "gpt2": _gpt2,
    "bert": _bert,
    "distilbert": _distilbert,
    "mpnet": _mpnet,
    "deberta_v2": _deberta_v2,
    "perceiver": _perceiver,
    "longformer": _longformer,
    "led": _led,
    "llama": _llama,
    "llama_checkpointed": _llama_checkpointed,
    "llama_lora": _llama_lora,
    "llama_dora": _llama_dora,
    "gpt2_lora": _gpt2_lora,
    "opt": _opt,
    "bart": _bart,
    "t5": _t5,
    "vit": _vit,
    "swin": _swin,
    "wav2vec2": _wav2vec2,
    "transformer_encoder_layer": _encoder_layer,
    "nanogpt": _nanogpt,
    "nanogpt_batch_is_seq": lambda: _nanogpt(batch=8, seq=8),
    "resnet_groupnorm": _resnet,
}
#: loss layout → (how to take it from the [b, 2] losses, batch_dim)
LAYOUTS: dict[str, tuple[Callable[[Tensor], Tensor], int | None]] = {
    "per_sample": (lambda losses: losses[:, 0], 0),
    "batch_tasks": (lambda losses: losses, 0),
    "tasks": (lambda losses: losses.mean(0), None),
}


#: the slowest models (seconds each on a loaded 2-core machine); CI still runs them
SLOW = {"t5", "nanogpt_batch_is_seq"}


def _cases() -> list:
    marks = {
        name: ([pytest.mark.slow] if name in SLOW else [])
        + ([] if name in NO_ROUTE_WARNING else [_IGNORE_ROUTE])
        for name in MODELS
    }
    return [
        pytest.param(name, layout, marks=marks[name], id=f"{name}-{layout}")
        for name in MODELS
        for layout in LAYOUTS
    ]


def _relative_error(actual: Tensor, expected: Tensor) -> float:
    scale = expected.abs().max().clamp_min(1e-300)
    return ((actual.double() - expected.double()).abs().max() / scale).item()


def check_model(name: str, layout: str, steps: int = 3) -> None:
    """``steps`` forwards (the first step of the structure, checked by the engine, then steps on
    the route it remembered), each giving an engine Gramian and a JDOptimizer ``.grad`` checked
    against the explicit Jacobian; the engine and the optimizer's engine hook the same model."""
    torch.manual_seed(0)
    model, run = MODELS[name]()
    model = model.double().train()
    pick, batch_dim = LAYOUTS[layout]
    params = [p for p in model.parameters() if p.requires_grad]
    sgd = torch.optim.SGD(params, lr=0.0)
    opt = JDOptimizer(sgd, UPGrad(), modules=model, batch_dim=batch_dim, scope="all")
    with Engine(model, batch_dim=batch_dim) as engine:
        for _ in range(steps):
            _check_step(engine, opt, pick(run(model)), params)


def _check_step(engine: Engine, opt: JDOptimizer, losses: Tensor, params: list[Tensor]) -> None:
    jacobian = explicit_jacobian(losses, params)
    expected = jacobian @ jacobian.T
    gramian = as_square(engine.compute_gramian(losses, retain_graph=True), losses.shape)
    assert _relative_error(gramian, expected) < 1e-9, "engine Gramian"
    opt.zero_grad()
    record = opt.step(losses)
    assert record.gramian is not None and record.weights is not None
    assert _relative_error(record.gramian, expected) < 1e-9, "JDOptimizer's Gramian"
    weights = UPGradWeighting()(expected)
    torch.testing.assert_close(record.weights.reshape(-1).double(), weights, atol=1e-6, rtol=1e-6)
    grads = torch.cat(
        [(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params]
    )
    assert _relative_error(grads, jacobian.T @ record.weights.reshape(-1).double()) < 1e-9, ".grad"


@pytest.mark.parametrize("name, layout", _cases())
def test_real_model(name: str, layout: str) -> None:
    check_model(name, layout)


@pytest.mark.parametrize("name", ["gpt2", "bert", "nanogpt", "bart", "swin", "t5"])
def test_position_embedding_expanded_per_sample(name: str) -> None:
    """GPT-2's, BERT's and BART's decoder's ``[1, s, d]`` (BART's from the ``[b, s]`` token ids,
    read for their shape) and nanoGPT's ``[t, d]`` position embedding, Swin's relative
    position bias (added to the ``[b·windows, …]`` scores, read at that addition) and T5's
    relative attention bias (``[q, k, heads]``, permuted and added to every layer's scores, read
    at those additions): every step is per-sample (``b`` = batch size, one backward pass) and
    exact, the first too: the step that sees an expandable call unexpanded reads it at the
    additions that give it to the samples (the next forwards expand it), where it once took
    one backward row per loss (``b`` rows through the whole model: out of memory at batch 512
    for GPT-2 tiny)."""
    torch.manual_seed(0)
    model, run = MODELS[name]()
    model = model.double().train()
    params = [p for p in model.parameters() if p.requires_grad]
    with Engine(model, batch_dim=0) as engine:
        for _ in range(3):
            losses = run(model)[:, 0]
            jacobian = explicit_jacobian(losses, params)
            step = engine.step(losses, params, [], per_sample=True)
            assert step.b == 4
            with torch.no_grad():
                gramian = step.gramian()
            assert _relative_error(gramian, jacobian @ jacobian.T) < 1e-9


def test_opt_token_rows_stay_per_sample() -> None:
    """OPT's MLP sees ``[b·s, d]`` token rows: read as ``s`` rows per sample, every step is on
    the per-sample path (``b`` rows, one backward pass) and exact, with no route warning."""
    torch.manual_seed(0)
    model, run = _opt()
    model = model.double().train()
    params = [p for p in model.parameters() if p.requires_grad]
    with Engine(model, batch_dim=0) as engine:
        for _ in range(2):
            losses = run(model)[:, 0]
            jacobian = explicit_jacobian(losses, params)
            step = engine.step(losses, params, [], per_sample=True)
            with torch.no_grad():
                gramian = step.gramian()
            assert step.b == 4
            assert _relative_error(gramian, jacobian @ jacobian.T) < 1e-9
            groups = {parts.rule.call.group for parts in step.rule_parameters}
            assert groups == {1, 8}  # the folded MLP rows and the [b, s, d] calls


@_IGNORE_ROUTE
def test_gpt2_projections_use_the_conv1d_rule() -> None:
    """transformers' ``Conv1D`` goes through its Linear-like rule (no generic re-run in GPT-2)."""
    from jdoptim.autogram import rules

    torch.manual_seed(0)
    model, run = _gpt2()
    model = model.double()
    with Engine(model, batch_dim=None) as engine:
        losses = run(model).mean(0)
        step = engine.step(losses, engine.parameters(), [], per_sample=False)
        kinds = {type(r.rule).__name__ for r in step.rule_parameters}
    assert "TransformersConv1DRule" in kinds
    assert not any(isinstance(r.rule, rules.GenericRule) for r in step.rule_parameters)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("low_memory", [False, True], ids=["default", "low-memory"])
def test_gpt2_tied_head_by_slices(
    layout: str, low_memory: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GPT-2's ``wte``, tied with its head, with a held-rows budget of nothing (as a real
    vocabulary at a large batch is): its Gramian summed over slices of the table's rows (each
    one row), the head's and the lookup's rows added per slice; by default the tied rows are not
    held, with ``low_memory`` the tied calls' rules are kept to the end of the backward. Engine
    Gramian and JDOptimizer ``.grad`` against the explicit Jacobian, dropout 0.1 in train mode."""
    import jdoptim.autogram._held_rows as held_rows
    import jdoptim.autogram._step as step_module
    import jdoptim.autogram._streaming as streaming

    monkeypatch.setattr(step_module, "held_rows_budget", lambda _: 0)
    monkeypatch.setattr(streaming, "held_rows_budget", lambda _: 0)  # (its slices' budget)
    sliced: list[int] = []
    original = held_rows._sliced_rows

    def counted(param: Tensor, rules: list, part: slice) -> Tensor | None:
        rows = original(param, rules, part)
        sliced.append(0 if rows is None else part.stop - part.start)
        return rows

    monkeypatch.setattr(held_rows, "_sliced_rows", counted)
    torch.manual_seed(0)
    model, run = _gpt2()
    model = model.double().train()
    pick, batch_dim = LAYOUTS[layout]
    params = [p for p in model.parameters() if p.requires_grad]
    sgd = torch.optim.SGD(params, lr=0.0)
    opt = JDOptimizer(
        sgd, UPGrad(), modules=model, batch_dim=batch_dim, scope="all", low_memory=low_memory
    )
    with Engine(model, batch_dim=batch_dim, low_memory=low_memory) as engine:
        for _ in range(2):
            losses = pick(run(model))
            jacobian = explicit_jacobian(losses, params)
            gramian = as_square(engine.compute_gramian(losses, retain_graph=True), losses.shape)
            expected = jacobian @ jacobian.T
            assert _relative_error(gramian, expected) < 1e-9
            weights = UPGrad().weighting(expected)
            opt.zero_grad()
            opt.step(losses)
            actual = torch.cat([p.grad.reshape(-1) for p in params])
            assert _relative_error(actual, weights @ jacobian) < 1e-8
    opt._update_computer.engine.close()  # type: ignore[attr-defined]
    if low_memory and batch_dim is None:  # (2 rows of the table weigh less than the head's D:
        assert not sliced  # summed during the backward, as they come)
    else:
        assert sliced and set(sliced) == {1}, "the tied table's Gramian was taken by slices"
