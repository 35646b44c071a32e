"""The Gramian engine on real models: a JD step with ``JDOptimizer(modules=model)`` vs a plain step.

Models (float32, train mode with their default dropout, random init, Adam):

* GPT-2 tiny: transformers' ``GPT2LMHeadModel``, 2 layers, width 32, 2 heads, vocabulary 512,
  batch 8, sequence 16 (tied head; the projections are transformers' ``Conv1D``);
* GPT-2 6 layers, width 256, 4 heads, sequence 128, batch 8 (``--large`` / ``BENCH_LARGE=1``);
* a small Llama: ``LlamaForCausalLM``, 2 layers, width 64, 4 heads, 2 key-value heads,
  vocabulary 512, batch 8, sequence 16;
* a ViT: ``ViTForImageClassification``, 32×32 images, patch 8, 2 layers, width 64, batch 16;
* ResNet-18 with GroupNorm (:class:`tests.models.ResNetGN`, widths 64–512, blocks 2-2-2-2,
  32 groups, CIFAR stem), 32×32 images, batch 8.

Settings: per-sample losses (``batch_dim=0``, UPGrad) against ``losses.mean().backward()``, and
2 / 8 task losses (``batch_dim=None``, UPGrad; a language model's tasks are the mean
cross-entropies of contiguous chunks of positions, a classifier's the binary cross-entropies of
its ``tasks`` outputs) against ``sum(losses).backward()``. Each JD step is timed alternately
with its plain step (:func:`benchmarks.interleave.interleaved_ratio`, median ratio); TorchJD 0.18's
autogram engine (``Engine`` + ``compute_gramian`` + ``losses.backward(weights)``, the weights by
jdoptim's ``UPGradWeighting``, so that the engines are what differs; TorchJD's own UPGrad needs
``qpsolvers``) beside it where it runs. :func:`gramian_errors` checks, on one forward, each
engine's Gramian against the explicit Jacobian's; peak extra memory is ``VmHWM`` over five steps
in a fresh process minus the resident size before them, and (``--memory``) the peak of the
tensors one step allocates after three warm-up steps (:func:`peak_tensor_mb`, the measure that
scales with the model; the resident size of these small models is mostly one-time costs).

Run: ``python benchmarks/test_bench_models.py`` (markdown tables; ``--large`` adds the 6-layer
GPT-2; ``BENCH_TINY=1`` shrinks every model for a smoke run; ``BENCH_BATCH=n`` runs every model
at batch ``n`` (default 8, ViT 16); ``--memory`` prints the tensor
memory table only, with the low-memory step beside the ordinary one; ``--low-memory`` times the
low-memory step too; ``--steady`` adds jdoptim's ratio in the steady state of a training loop,
blocks of consecutive steps, :func:`benchmarks.interleave.block_ratios`), or
``python -m pytest benchmarks/test_bench_models.py --benchmark-only -q``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.interleave import block_ratios, interleaved_ratio
from benchmarks.test_bench_engine import _peak_mb, _rss_mb  # noqa: F401  (used in peak_extra_mb)
from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGrad, UPGradWeighting
from jdoptim.autogram import Engine
from tests.models import NanoGPT, ResNetGN

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
TINY = os.environ.get("BENCH_TINY") == "1"
LARGE = os.environ.get("BENCH_LARGE") == "1" or "--large" in sys.argv
MODELS = ["gpt2-tiny", "llama-small", "vit", "resnet18-gn"] + (["gpt2-6x256"] if LARGE else [])
SETTINGS = {"per-sample": 0, "2 tasks": 2, "8 tasks": 8}
METHODS = ["jdoptim UPGrad", "torchjd autogram"]
#: the engine's low-memory step (``low_memory=True``): in the memory table, and timed with
#: ``--low-memory`` (it adds a column to the time table)
LOW_MEMORY = "jdoptim UPGrad, low memory"
#: jdoptim without ``modules=`` (the explicit-Jacobian path): not in the default table; for the
#: memory comparison, e.g. ``peak_extra_mb("resnet18-gn", "8 tasks", JACOBIAN_PATH)``.
JACOBIAN_PATH = "jdoptim UPGrad, Jacobian path"
VOCAB = 64 if TINY else 512
#: ``BENCH_BATCH=n`` runs every model at batch ``n`` (default: 8, ViT 16; 4 with ``BENCH_TINY``)
BATCH = os.environ.get("BENCH_BATCH")


def _batch(default: int) -> int:
    """The batch size of a model: ``BENCH_BATCH`` where set, else ``default``."""
    return int(BATCH) if BATCH and not TINY else default


Losses = Callable[[nn.Module], Tensor]  # model → per-sample [b] or task [tasks] losses


def _transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def _lm_batch(batch: int, seq: int) -> Tensor:
    return torch.randint(0, VOCAB, (batch, seq))


def _lm_losses(tokens: Tensor, tasks: int, bare: bool = False) -> Losses:
    """Per-sample mean next-token cross-entropy, or ``tasks`` chunks of positions' batch means
    (``bare``: the model returns the logits themselves)."""

    def losses(model: nn.Module) -> Tensor:
        return _next_token_losses(model(tokens) if bare else model(tokens).logits, tokens, tasks)

    return losses


def _next_token_losses(logits: Tensor, tokens: Tensor, tasks: int) -> Tensor:
    """:func:`_lm_losses` of the logits ``[b, s, V]`` predicting ``tokens[:, 1:]``."""
    logits = logits[:, :-1]
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none"
    ).view(tokens.shape[0], -1)
    if tasks == 0:
        return ce.mean(1)
    return torch.stack([chunk.mean() for chunk in ce.tensor_split(tasks, dim=1)])


def _class_losses(inputs: Tensor, tasks: int, logits_of: Callable[[nn.Module], Tensor]) -> Losses:
    """Per-sample cross-entropy over 10 classes, or ``tasks`` binary cross-entropies."""
    if tasks == 0:
        labels = torch.randint(0, 10, (inputs.shape[0],))
        return lambda m: F.cross_entropy(logits_of(m), labels, reduction="none")
    targets = torch.randint(0, 2, (inputs.shape[0], tasks)).to(inputs.dtype)
    return lambda m: F.binary_cross_entropy_with_logits(
        logits_of(m), targets, reduction="none"
    ).mean(0)


def _gpt2(tasks: int, layers: int, width: int, heads: int, seq: int) -> tuple[nn.Module, Losses]:
    config = _transformers().GPT2Config(
        vocab_size=VOCAB, n_positions=seq, n_embd=width, n_layer=layers, n_head=heads
    )
    model = _transformers().GPT2LMHeadModel(config)
    return model, _lm_losses(_lm_batch(_batch(8 if not TINY else 4), seq), tasks)


def _llama(tasks: int) -> tuple[nn.Module, Losses]:
    width = 16 if TINY else 64
    config = _transformers().LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = _transformers().LlamaForCausalLM(config)
    return model, _lm_losses(_lm_batch(_batch(8 if not TINY else 4), 12 if TINY else 16), tasks)


def _deberta(tasks: int, v2: bool) -> tuple[nn.Module, Losses]:
    """DeBERTa with relative attention (content-to-position and position-to-content). ``v2``:
    its relative embeddings read by the encoder and repeated along the batch in every layer;
    v1: its attention module has direct parameters (``q_bias``, ``v_bias``) and is given
    ``rel_embeddings.weight`` as an argument."""
    width = 16 if TINY else 64
    kind = "DebertaV2" if v2 else "Deberta"
    config = getattr(_transformers(), f"{kind}Config")(
        vocab_size=VOCAB,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        relative_attention=True,
        max_relative_positions=16,
        pos_att_type=["p2c", "c2p"],
        pooler_hidden_size=width,
        num_labels=tasks or 10,
        **({"position_buckets": 8} if v2 else {}),
    )
    model = getattr(_transformers(), f"{kind}ForSequenceClassification")(config)
    tokens = _lm_batch(_batch(8 if not TINY else 4), 12 if TINY else 16)
    return model, _class_losses(tokens.float(), tasks, lambda m: m(input_ids=tokens).logits)


class OwnTokensViT(nn.Module):
    """A ViT written as timm writes it: ``cls_token`` and ``pos_embed`` are parameters of the
    model itself, around its blocks (``nn.TransformerEncoderLayer``, pre-norm, dropout 0.1)."""

    def __init__(self, width: int, depth: int, patches: int, patch_dim: int, classes: int):
        super().__init__()
        self.patch = nn.Linear(patch_dim, width)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, patches + 1, width) * 0.02)
        self.blocks = nn.Sequential(
            *[
                nn.TransformerEncoderLayer(
                    width, 4, 2 * width, dropout=0.1, batch_first=True, norm_first=True
                )
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:  # [b, patches, patch_dim]
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), self.patch(x)], dim=1)
        return self.head(self.norm(self.blocks(tokens + self.pos_embed))[:, 0])


def _vit_own_tokens(tasks: int) -> tuple[nn.Module, Losses]:
    width = 16 if TINY else 64
    model = OwnTokensViT(width, 2, 16, 48, tasks or 10)
    images = torch.randn(_batch(4 if TINY else 16), 16, 48)
    return model, _class_losses(images, tasks, lambda m: m(images))


def _longformer(tasks: int) -> tuple[nn.Module, Losses]:
    """Longformer: sliding-window self-attention projected sequence-first (``[s, b, d]``) inside a
    batch-first model, global attention on the first token."""
    width = 16 if TINY else 64
    config = _transformers().LongformerConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=80,
        attention_window=[8, 8],
        num_labels=tasks or 10,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    model = _transformers().LongformerForSequenceClassification(config)
    tokens = _lm_batch(_batch(8 if not TINY else 4), 16 if TINY else 32).clamp_min(3)
    return model, _class_losses(tokens.float(), tasks, lambda m: m(input_ids=tokens).logits)


def _switch(tasks: int) -> tuple[nn.Module, Losses]:
    """Switch Transformers' encoder: top-1 token routing to 4 experts (``h[index]`` of the
    batch's tokens per expert), 2 layers, width 32, sequence 16, a mean-pooled linear head."""
    width = 16 if TINY else 32
    config = _transformers().SwitchTransformersConfig(
        vocab_size=VOCAB, d_model=width, d_kv=8, d_ff=2 * width, num_layers=2, num_heads=4,
        num_experts=4, expert_capacity=64, num_sparse_encoder_layers=2, dropout_rate=0.1,
    )  # fmt: skip
    encoder = _transformers().SwitchTransformersEncoderModel(config)
    model = nn.ModuleDict({"encoder": encoder, "head": nn.Linear(width, tasks or 10)})
    tokens = _lm_batch(_batch(8 if not TINY else 4), 16)

    def logits(m: nn.Module) -> Tensor:
        return m["head"](m["encoder"](input_ids=tokens).last_hidden_state.mean(1))

    return model, _class_losses(tokens.float(), tasks, logits)


def _fsmt(tasks: int) -> tuple[nn.Module, Losses]:
    """FSMT (fairseq's translation transformer): sequence-first inside a batch-first model,
    heads folded into the batch by views; sequence 16 = 2 x batch 8."""
    width = 16 if TINY else 32
    config = _transformers().FSMTConfig(
        langs=["en", "de"], src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, d_model=width,
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=2 * width, decoder_ffn_dim=2 * width, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = _transformers().FSMTForConditionalGeneration(config)
    source = _lm_batch(_batch(8 if not TINY else 4), 16).clamp_min(3)
    target = source.flip(1)

    def losses(m: nn.Module) -> Tensor:
        logits = m(input_ids=source, decoder_input_ids=target).logits
        return _next_token_losses(logits, target, tasks)

    return model, losses


def _vit(tasks: int, dtype: torch.dtype) -> tuple[nn.Module, Losses]:
    width, size = (16, 8) if TINY else (64, 32)
    config = _transformers().ViTConfig(
        image_size=size,
        patch_size=size // 4,
        num_channels=3,
        hidden_size=width,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * width,
        num_labels=tasks or 10,
    )
    model = _transformers().ViTForImageClassification(config)
    images = torch.randn(_batch(4 if TINY else 16), 3, size, size, dtype=dtype)
    return model, _class_losses(images, tasks, lambda m: m(pixel_values=images).logits)


def _resnet(tasks: int, dtype: torch.dtype) -> tuple[nn.Module, Losses]:
    if TINY:
        model = ResNetGN(widths=(8, 16), blocks=(1, 1), classes=tasks or 10, groups=2)
        images = torch.randn(4, 3, 8, 8, dtype=dtype)
    else:
        widths, blocks = (64, 128, 256, 512), (2, 2, 2, 2)
        model = ResNetGN(widths=widths, blocks=blocks, classes=tasks or 10, groups=32)
        images = torch.randn(_batch(8), 3, 32, 32, dtype=dtype)
    return model, _class_losses(images, tasks, lambda m: m(images))


def build(
    model_name: str, setting: str, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, Losses]:
    """A fresh model (seeded, in ``dtype``) and the closure computing its losses for
    ``setting``."""
    torch.manual_seed(0)
    tasks = SETTINGS[setting]
    if model_name == "gpt2-tiny":
        model, losses = _gpt2(tasks, 2, 16 if TINY else 32, 2, 12 if TINY else 16)
    elif model_name == "gpt2-6x256":
        model, losses = _gpt2(tasks, 6, 256, 4, 128)
    elif model_name == "llama-small":
        model, losses = _llama(tasks)
    elif model_name in ("nanogpt", "nanogpt-read-head"):  # (not in MODELS, by name)
        model = NanoGPT(VOCAB, 16, 32, 2, 2, read_head=model_name.endswith("read-head"))
        losses = _lm_losses(_lm_batch(_batch(8 if not TINY else 4), 16), tasks, bare=True)
    elif model_name == "deberta-v2-small":  # (not in MODELS: by name, e.g. ab_inprocess.py)
        model, losses = _deberta(tasks, v2=True)
    elif model_name == "longformer-small":  # (not in MODELS: by name)
        model, losses = _longformer(tasks)
    elif model_name == "deberta-small":  # (not in MODELS: by name)
        model, losses = _deberta(tasks, v2=False)
    elif model_name == "vit-own-tokens":  # (not in MODELS: by name)
        model, losses = _vit_own_tokens(tasks)
    elif model_name == "switch-small":  # (not in MODELS: by name)
        model, losses = _switch(tasks)
    elif model_name == "fsmt-small":  # (not in MODELS: by name)
        model, losses = _fsmt(tasks)
    elif model_name == "vit":
        model, losses = _vit(tasks, dtype)
    else:
        model, losses = _resnet(tasks, dtype)
    return model.to(dtype), losses


def make_step(model_name: str, setting: str, method: str) -> Callable[[], None]:
    """A closure running one training step of ``method`` (``"plain"`` included)."""
    model, losses = build(model_name, setting)
    model.train()
    adam = torch.optim.Adam(model.parameters(), lr=1e-4)
    per_sample = SETTINGS[setting] == 0
    batch_dim = 0 if per_sample else None
    if method == "plain":

        def plain() -> None:
            adam.zero_grad()
            value = losses(model)
            (value.mean() if per_sample else value.sum()).backward()
            adam.step()

        return plain
    if method in ("jdoptim UPGrad", LOW_MEMORY):
        low = method == LOW_MEMORY
        opt = JDOptimizer(adam, UPGrad(), modules=model, batch_dim=batch_dim, low_memory=low)

        def jd() -> None:
            opt.zero_grad()
            opt.step(losses(model))

        jd.engine = getattr(opt._update_computer, "engine", None)  # type: ignore[attr-defined]
        return jd
    if method == JACOBIAN_PATH:  # no modules=: the explicit Jacobian (T × P), no hooks
        opt = JDOptimizer(adam, UPGrad())

        def jacobian_path() -> None:
            opt.zero_grad()
            opt.step(losses(model))

        return jacobian_path
    from torchjd.autogram import Engine as TjdEngine

    engine = TjdEngine(model, batch_dim=batch_dim)
    weighting = UPGradWeighting()  # (TorchJD's own needs qpsolvers; the engines are compared)

    def torchjd() -> None:
        adam.zero_grad()
        value = losses(model)
        value.backward(weighting(engine.compute_gramian(value)))
        adam.step()

    return torchjd


def gramian_errors(model_name: str, setting: str) -> dict[str, float | str]:
    """On one forward (same dropout masks): each engine's Gramian against the explicit
    Jacobian's, as the relative max-entry error (or the error message where it fails)."""
    model, losses_of = build(model_name, setting)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    batch_dim = 0 if SETTINGS[setting] == 0 else None
    ours = Engine(model, batch_dim=batch_dim)
    result: dict[str, float | str] = {}
    try:
        from torchjd.autogram import Engine as TjdEngine

        theirs = TjdEngine(model, batch_dim=batch_dim)
    except Exception as error:  # (not installed, or refuses the model)
        theirs, result["torchjd"] = None, f"{type(error).__name__}: {error}"[:120]
    losses = losses_of(model)
    rows = [
        torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses
    ]
    jacobian = torch.stack(
        [
            torch.cat(
                [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(r, params)]
            )
            for r in rows
        ]
    ).double()
    expected = jacobian @ jacobian.T
    scale = expected.abs().max()
    for name, engine in (("torchjd", theirs), ("jdoptim", ours)):
        if engine is None:
            continue
        try:
            if name == "jdoptim":
                gramian = engine.compute_gramian(losses, retain_graph=True)
            else:
                gramian = engine.compute_gramian(losses)
            result[name] = ((gramian.double() - expected).abs().max() / scale).item()
        except Exception as error:
            result[name] = f"{type(error).__name__}: {error}"[:120]
    ours.close()
    return result


def measure_ratio(model_name: str, setting: str, method: str, rounds: int = 20) -> dict:
    return interleaved_ratio(
        make_step(model_name, setting, method), make_step(model_name, setting, "plain"), rounds
    )


def measure_steady_ratio(model_name: str, setting: str, method: str) -> float:
    """``method``'s step time over the plain step's in the steady state of a training loop
    (blocks of consecutive steps, :func:`benchmarks.interleave.block_ratios`)."""
    cycles, block = (2, 2) if TINY else (8, 8)
    steps = {
        "plain": make_step(model_name, setting, "plain"),
        method: make_step(model_name, setting, method),
    }
    medians = block_ratios(steps, cycles=cycles, block=block)
    return medians[method] / medians["plain"]


def peak_extra_mb(model_name: str, setting: str, method: str) -> float:
    """In a fresh process: peak resident size over five steps minus the size before them."""
    code = (
        f"import json, torch; torch.set_num_threads({THREADS});"
        "from benchmarks.test_bench_models import make_step, _rss_mb, _peak_mb;"
        f"step = make_step({model_name!r}, {setting!r}, {method!r}); before = _rss_mb();"
        "open('/proc/self/clear_refs', 'w').write('5');"
        "[step() for _ in range(5)];"
        "print(json.dumps(_peak_mb() - before))"
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def peak_tensor_mb(model_name: str, setting: str, method: str, warmup: int = 3) -> float:
    """The peak of the tensor memory a step allocates on top of what exists before it (forward
    included), after ``warmup`` steps: the running sum of the allocation and free events that
    ``torch.profiler`` records (``profile_memory=True``) during one step, at its highest.

    Unlike :func:`peak_extra_mb` (the process's resident size), this counts tensors only, so the
    one-time costs of a first step (libraries' buffers, allocator arenas that stay mapped) and
    memory that the C allocator keeps after a free do not blur it: after a few steps the
    resident size grows by nothing on either step. The matrix the engine keeps between steps for
    the held rows (``Engine.held_rows_bytes``) is counted as live from the step's start."""
    from torch.profiler import ProfilerActivity, profile

    step = make_step(model_name, setting, method)
    for _ in range(warmup):
        step()
    engine = getattr(step, "engine", None)
    kept = 0 if engine is None else engine.held_rows_bytes  # (allocated before, used by the step)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    assert prof.profiler is not None
    events = prof.profiler.kineto_results.events()
    changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live = peak = kept
    for _, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def memory_tables() -> None:
    """The peak-memory rows: tensors allocated by a step (:func:`peak_tensor_mb`) and the
    resident size (:func:`peak_extra_mb`), plain step and each method."""
    methods = [METHODS[0], LOW_MEMORY, *METHODS[1:]]
    print("| peak step tensors (MB) | setting | plain | " + " | ".join(methods) + " |")
    print("|---|---|---|" + "---|" * len(methods))
    for model_name in MODELS:
        for setting in SETTINGS:
            row = []
            plain = peak_tensor_mb(model_name, setting, "plain")
            for method in methods:
                if _runs(method, model_name, setting):
                    row.append("-")
                    continue
                peak = peak_tensor_mb(model_name, setting, method)
                row.append(f"{peak:.1f} ({peak / plain:.2f}×)")
            print(f"| {model_name} | {setting} | {plain:.1f} | " + " | ".join(row) + " |")


def _runs(method: str, model_name: str, setting: str) -> str | None:
    """``None`` if ``method`` runs a step on this case, else why not."""
    try:
        make_step(model_name, setting, method)()
    except Exception as error:
        return f"{type(error).__name__}: {error}"[:120]
    return None


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("model_name", MODELS)
def test_model_step(benchmark, model_name: str, setting: str, method: str) -> None:
    pytest.importorskip("transformers")
    if method.startswith("torchjd"):
        pytest.importorskip("torchjd")
        problem = _runs(method, model_name, setting)
        if problem:
            pytest.skip(f"torchjd does not run here: {problem}")
    benchmark.group = f"models: {model_name}, {setting}"
    rounds = 3 if TINY else 20
    benchmark.extra_info.update(measure_ratio(model_name, setting, method, rounds))
    benchmark(make_step(model_name, setting, method))


@pytest.mark.parametrize("setting", ["2 tasks", "8 tasks"])
@pytest.mark.parametrize("model_name", MODELS)
def test_task_floor_matches_library(model_name: str, setting: str) -> None:
    """The hand-fused floor of :mod:`benchmarks.hand_fused_models` computes the library's
    Gramian (float64, one forward), so that its time is a floor of the same arithmetic."""
    pytest.importorskip("transformers")
    from benchmarks.hand_fused_models import check_against_library

    assert check_against_library(model_name, setting) < 1e-9


def main() -> None:
    torch.set_num_threads(THREADS)
    if "--memory" in sys.argv:
        warnings.simplefilter("ignore")  # (torch's profiler and vmap notes)
        memory_tables()
        return
    rounds = 3 if TINY else int(os.environ.get("BENCH_ROUNDS", "30"))
    timed = [*METHODS, *([LOW_MEMORY] if "--low-memory" in sys.argv else [])]
    steady = "--steady" in sys.argv  # a column of jdoptim's steady-state ratio
    header = [*timed, *(["jdoptim UPGrad, steady state"] if steady else [])]
    print("| model | setting | plain step (ms) | " + " | ".join(header) + " |")
    print("|---|---|---|" + "---|" * len(header))
    for model_name in MODELS:
        for setting in SETTINGS:
            cells, plain = [], []
            for method in timed:
                problem = _runs(method, model_name, setting)
                if problem:
                    cells.append(f"fails ({problem.split(':')[0]})")
                    continue
                result = measure_ratio(model_name, setting, method, rounds)
                plain.append(result["baseline_ms"])
                cells.append(f"{result['ratio_median']:.2f}×")
            if steady:
                ratio = measure_steady_ratio(model_name, setting, "jdoptim UPGrad")
                cells.append(f"{ratio:.2f}×")
            base = f"{sorted(plain)[len(plain) // 2]:.1f}" if plain else "-"
            print(f"| {model_name} | {setting} | {base} | " + " | ".join(cells) + " |")
    print()
    print("| model | setting | Gramian rel. error: jdoptim | torchjd |")
    print("|---|---|---|---|")
    for model_name in MODELS:
        for setting in ("per-sample", "2 tasks"):
            errors = gramian_errors(model_name, setting)
            cells = [errors.get(k, "-") for k in ("jdoptim", "torchjd")]
            text = [f"{c:.1e}" if isinstance(c, float) else str(c) for c in cells]
            print(f"| {model_name} | {setting} | " + " | ".join(text) + " |")
    print()
    print("| peak extra memory (MB) | setting | plain | " + " | ".join(METHODS) + " |")
    print("|---|---|---|" + "---|" * len(METHODS))
    for model_name in MODELS:
        for setting in ("per-sample", "8 tasks"):
            row = []
            for method in ["plain", *METHODS]:
                if method != "plain" and _runs(method, model_name, setting):
                    row.append("-")
                    continue
                row.append(f"{peak_extra_mb(model_name, setting, method):.0f}")
            print(f"| {model_name} | {setting} | " + " | ".join(row) + " |")
    print(json.dumps({"torch": torch.__version__, "threads": THREADS, "tiny": TINY}))


if __name__ == "__main__":
    main()
