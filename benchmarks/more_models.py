"""Per-sample JD on more transformers models: the layouts the engine used to leave its fast path on.

* OPT runs its MLP on ``hidden.reshape(-1, d)``: ``b·s`` token rows, read since the eleventh
  session as ``s`` rows per sample (``Call.group``) instead of one backward row per loss;
* BART's decoder position embedding takes the batch's token ids for their shape and returns
  ``[1, s, d]``: expanded along the batch since the same session (the first step of a structure
  is row-per-loss, the next ones per-sample);
* wav2vec2's convolutional position embedding is weight-normed (its weight computed in the
  forward): it crashed before (a reshape error in the convolution rule), and now takes the
  generic rule;
* Swin adds its relative position bias ``[1, heads, N, N]`` to the scores of ``b·windows``
  windows: read at that addition since the same session, where every per-sample step was one
  backward row per loss;
* T5 permutes its relative attention bias ``[q, k, heads]`` and adds it to every layer's scores:
  read at those additions since the twelfth session, where every per-sample step was one
  backward row per loss.

Each row: ``JDOptimizer(Adam, UPGrad(), modules=model, batch_dim=0)`` on per-sample losses
against ``losses.mean().backward(); adam.step()`` on the same model and batch, timed alternately
(median of the per-round ratios; :mod:`benchmarks.interleave`), float32, train mode with the
models' default dropout, batch 8.

Run: ``PYTHONPATH=$PWD BENCH_THREADS=2 python benchmarks/more_models.py [MODEL ...]`` (markdown
table; all models by default).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.interleave import interleaved_ratio
from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGrad

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
VOCAB, BATCH, SEQ = 512, 8, 16
Built = tuple[nn.Module, Callable[[nn.Module], Tensor]]  # model, model → per-sample losses [b]


def _transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def _lm_losses(logits: Tensor, tokens: Tensor) -> Tensor:
    b, s, v = logits.shape
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, v), tokens[:, 1:].reshape(-1), reduction="none")
    return ce.view(b, s - 1).mean(1)


def opt() -> Built:
    t = _transformers()
    config = t.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=256,
        max_position_embeddings=64,
        word_embed_proj_dim=64,
    )
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ))
    return t.OPTForCausalLM(config), lambda m: _lm_losses(m(tokens).logits, tokens)


def bart() -> Built:
    t = _transformers()
    config = t.BartConfig(
        vocab_size=VOCAB,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=256,
        decoder_ffn_dim=256,
        max_position_embeddings=64,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
    )
    tokens = torch.randint(3, VOCAB, (BATCH, SEQ))
    return t.BartForCausalLM(config), lambda m: _lm_losses(m(input_ids=tokens).logits, tokens)


def wav2vec2() -> Built:
    t = _transformers()
    config = t.Wav2Vec2Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        conv_dim=(32, 32),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        mask_time_prob=0.0,
        num_labels=4,
    )
    audio = torch.randn(BATCH, 1600)
    labels = torch.randint(0, 4, (BATCH,))

    def losses(m: nn.Module) -> Tensor:
        return F.cross_entropy(m(input_values=audio).logits, labels, reduction="none")

    return t.Wav2Vec2ForSequenceClassification(config), losses


def swin() -> Built:
    t = _transformers()
    config = t.SwinConfig(
        image_size=32,
        patch_size=2,
        embed_dim=32,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=4,
        num_labels=10,
    )
    images = torch.randn(BATCH, 3, 32, 32)
    labels = torch.randint(0, 10, (BATCH,))

    def losses(m: nn.Module) -> Tensor:
        return F.cross_entropy(m(pixel_values=images).logits, labels, reduction="none")

    return t.SwinForImageClassification(config), losses


def t5() -> Built:
    t = _transformers()
    config = t.T5Config(
        vocab_size=VOCAB,
        d_model=64,
        d_kv=32,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        relative_attention_num_buckets=16,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    source = torch.randint(1, VOCAB, (BATCH, SEQ))
    target = torch.randint(1, VOCAB, (BATCH, SEQ // 2))

    def losses(m: nn.Module) -> Tensor:
        logits = m(input_ids=source, labels=target).logits
        return F.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(1)

    return t.T5ForConditionalGeneration(config), losses


MODELS: dict[str, Callable[[], Built]] = {
    "opt": opt,
    "bart": bart,
    "wav2vec2": wav2vec2,
    "swin": swin,
    "t5": t5,
}


def step_pair(name: str) -> tuple[Callable[[], None], Callable[[], None]]:
    """The per-sample JD step and the plain step, each on its own copy of the model."""
    steps = []
    for jd in (True, False):
        torch.manual_seed(0)
        model, losses_of = MODELS[name]()
        model.train()
        adam = torch.optim.Adam(model.parameters(), lr=1e-4)
        if jd:
            opt = JDOptimizer(adam, UPGrad(), modules=model, batch_dim=0)

            def jd_step(opt: JDOptimizer = opt, model: nn.Module = model, f=losses_of) -> None:
                opt.zero_grad()
                opt.step(f(model))

            steps.append(jd_step)
        else:

            def plain_step(adam=adam, model: nn.Module = model, f=losses_of) -> None:
                adam.zero_grad()
                f(model).mean().backward()
                adam.step()

            steps.append(plain_step)
    return steps[0], steps[1]


def main() -> None:
    torch.set_num_threads(THREADS)
    warnings.simplefilter("ignore")  # (route warnings of the first step, torch's vmap notes)
    rounds = 3 if "--quick" in sys.argv else 15
    print("| model | plain step (ms) | JD step (ms) | per-sample JD / plain |")
    print("|---|---|---|---|")
    chosen = [name for name in sys.argv[1:] if name in MODELS] or list(MODELS)
    for name in chosen:
        jd, plain = step_pair(name)
        result = interleaved_ratio(jd, plain, rounds)
        print(
            f"| {name} | {result['baseline_ms']:.1f} | {result['candidate_ms']:.1f} "
            f"| {result['ratio_median']:.2f}× |",
            flush=True,
        )


if __name__ == "__main__":
    main()
