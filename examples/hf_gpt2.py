"""A run file: a tiny GPT-2 language model (HuggingFace transformers) on synthetic sequences.

    curvscope run examples/hf_gpt2.py --budget small --threads 1

``GPT2LMHeadModel`` from a tiny ``GPT2Config`` (random initialisation, nothing is downloaded; the
output layer is tied to the token embedding), trained for a few dozen Adam steps on sequences from
a few "grammars": sequence ``i`` counts modulo ``VOCAB - 1`` with stride ``1 + i mod K`` and some
noise, so the model must infer the stride from the context. Sequences have different lengths and
are right-padded: ``attention_mask`` is 0 and ``labels`` is -100 at the padding.

The loss is :class:`curvscope.CausalLMLoss`, HuggingFace's convention: cross-entropy of
``logits[:, :-1]`` against ``labels[:, 1:]``, averaged over the tokens that are not -100, and the
dataset loss is the mean over all such tokens (the batches are weighted by their token counts).
Trained in float32, analysed in float64. Needs ``pip install transformers`` (the project's extra
``real``).
"""

import torch
from torch import nn

from curvscope import CausalLMLoss
from curvscope.testing import import_transformers

GRAMMARS, VOCAB, MAX_LEN, N_TRAIN, N_TEST, BATCH = 3, 17, 12, 96, 48, 40
PAD = VOCAB - 1  # never a real token: the counting runs modulo VOCAB - 1


def _sequences(n: int, seed: int) -> dict[str, torch.Tensor]:
    """``n`` right-padded sequences of 6..12 tokens, 10 % of the tokens replaced by noise."""
    g = torch.Generator().manual_seed(seed)
    stride = 1 + torch.arange(n) % GRAMMARS
    start = torch.randint(0, VOCAB - 1, (n, 1), generator=g)
    ids = (start + stride[:, None] * torch.arange(MAX_LEN)[None, :]) % (VOCAB - 1)
    noisy = torch.rand(n, MAX_LEN, generator=g) < 0.1
    ids = torch.where(noisy, torch.randint(0, VOCAB - 1, (n, MAX_LEN), generator=g), ids)
    lengths = torch.randint(MAX_LEN // 2, MAX_LEN + 1, (n,), generator=g)
    mask = torch.arange(MAX_LEN)[None, :] < lengths[:, None]
    ids = ids.masked_fill(~mask, PAD)
    return {"input_ids": ids, "attention_mask": mask.long(), "labels": ids.masked_fill(~mask, -100)}


def _batches(full: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    n = len(full["labels"])
    return [{k: v[i : i + BATCH] for k, v in full.items()} for i in range(0, n, BATCH)]


def model() -> nn.Module:
    """2 layers, 32-dimensional embeddings, 2 heads, tied output layer: about 26k parameters."""
    transformers = import_transformers()
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=MAX_LEN, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=PAD, eos_token_id=PAD, pad_token_id=PAD, tie_word_embeddings=True)
    torch.manual_seed(0)
    net = transformers.GPT2LMHeadModel(config)
    train = _sequences(N_TRAIN, seed=1)
    labels = train.pop("labels")
    loss_fn = CausalLMLoss()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for _ in range(60):
        opt.zero_grad()
        loss_fn(net(**train).logits, labels).backward()
        opt.step()
    return net.double().eval()


def loss() -> CausalLMLoss:
    return CausalLMLoss()


def data() -> list:
    return _batches(_sequences(N_TRAIN, seed=1))


def test_data() -> list:
    return _batches(_sequences(N_TEST, seed=2))
