"""A run file: a tiny BERT sequence classifier (HuggingFace transformers) on synthetic sentences.

    curvscope run examples/hf_bert.py --budget small --threads 1

``BertForSequenceClassification`` from a tiny ``BertConfig`` (random initialisation, nothing is
downloaded), trained for a few dozen Adam steps on token sequences whose class decides which
"keyword" tokens they contain. Batches are HuggingFace-style dicts (``input_ids``,
``attention_mask`` with right padding, ``labels``); curvscope passes everything but ``labels`` to
the model and takes its ``.logits``. Attention runs through ``F.scaled_dot_product_attention``
(transformers' default "sdpa"), whose second derivatives curvscope takes on SDPA's math path.
The model is trained in float32 and analysed in float64, where the eigensolvers' residuals reach
their tolerance. Needs ``pip install transformers`` (the project's extra ``real``).
"""

import torch
from torch import nn

from curvscope.testing import import_transformers

NUM_CLASSES, VOCAB, MAX_LEN, N_TRAIN, N_TEST, BATCH = 3, 40, 12, 100, 48, 32
PAD, CLS, KEYWORDS = 0, 1, 6  # token ids: [PAD], [CLS]; KEYWORDS tokens per class from id 2


def _sentences(n: int, seed: int) -> dict[str, torch.Tensor]:
    """``n`` sequences of 6..12 tokens: [CLS], then a mix of 30 % class keywords and noise tokens."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % NUM_CLASSES
    first_noise = 2 + KEYWORDS * NUM_CLASSES
    keywords = 2 + KEYWORDS * y[:, None] + torch.randint(0, KEYWORDS, (n, MAX_LEN), generator=g)
    noise = torch.randint(first_noise, VOCAB, (n, MAX_LEN), generator=g)
    ids = torch.where(torch.rand(n, MAX_LEN, generator=g) < 0.3, keywords, noise)
    ids[:, 0] = CLS
    lengths = torch.randint(MAX_LEN // 2, MAX_LEN + 1, (n,), generator=g)
    mask = torch.arange(MAX_LEN)[None, :] < lengths[:, None]
    return {"input_ids": ids.masked_fill(~mask, PAD), "attention_mask": mask.long(), "labels": y}


def _batches(full: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    n = len(full["labels"])
    return [{k: v[i : i + BATCH] for k, v in full.items()} for i in range(0, n, BATCH)]


def model() -> nn.Module:
    """2 layers, hidden size 32, 2 heads: about 22k parameters, trained for 40 steps."""
    transformers = import_transformers()
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=MAX_LEN, type_vocab_size=1,
        num_labels=NUM_CLASSES, pad_token_id=PAD)
    torch.manual_seed(0)
    net = transformers.BertForSequenceClassification(config)
    train = _sentences(N_TRAIN, seed=1)
    labels = train.pop("labels")
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(net(**train).logits, labels).backward()
        opt.step()
    return net.double().eval()


def loss() -> nn.Module:
    return nn.CrossEntropyLoss()


def data() -> list:
    return _batches(_sentences(N_TRAIN, seed=1))


def test_data() -> list:
    return _batches(_sentences(N_TEST, seed=2))
