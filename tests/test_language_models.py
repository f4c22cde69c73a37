"""Token-level losses: causal LMs with shifted labels, padding (-100), tied weights, own losses."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvscope as cs
from curvscope.testing.dense import dense_ggn, dense_hessian

VOCAB, D, PAD = 11, 8, 0


class TinyCausalLM(nn.Module):
    """Embedding, one causal SDPA layer, an LM head tied to the embedding (GPT-2's layout)."""

    def __init__(self, own_loss=False):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, D)
        self.qkv = nn.Linear(D, 3 * D)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.own_loss = own_loss

    def forward(self, input_ids, labels=None):
        x = self.wte(input_ids)
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        logits = self.lm_head(torch.tanh(x + a))
        if not self.own_loss:
            return logits
        loss = None if labels is None else cs.CausalLMLoss()(logits, labels)
        return {"loss": loss, "logits": logits}


def _sequences(lengths, T, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), T), generator=g)
    labels = ids.clone()
    for i, n in enumerate(lengths):
        ids[i, n:] = PAD
        labels[i, n:] = -100
    return ids, labels


def _padded(ids, labels, T):
    extra = T - ids.shape[1]
    return (torch.cat([ids, ids.new_full((ids.shape[0], extra), PAD)], 1),
            torch.cat([labels, labels.new_full((labels.shape[0], extra), -100)], 1))


def _model(own_loss=False):
    torch.manual_seed(0)
    return TinyCausalLM(own_loss).double().eval()


def _batches():
    a = _sequences([6, 3, 5], 6, seed=1)  # 3 sequences, 11 counted (shifted) tokens
    b = _sequences([9, 2], 9, seed=2)  # 2 sequences, 9 counted tokens
    return [a, b]


def _vectors(P, k=3):
    return torch.randn(P, k, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def test_unequal_padding_equals_one_merged_batch():
    model, loss = _model(), cs.CausalLMLoss()
    (ia, la), (ib, lb) = _batches()
    ia, la = _padded(ia, la, 9)
    merged = [(torch.cat([ia, ib]), torch.cat([la, lb]))]
    split = _batches()
    p_split, p_merged = cs.Problem(model, loss, split), cs.Problem(model, loss, merged)
    assert p_split.num_data == p_merged.num_data == (5 + 2 + 4) + (8 + 1)  # counted tokens
    assert p_split.data_unit == "tokens"
    assert cs.Problem(model, nn.CrossEntropyLoss(), [(torch.zeros(2, 3), torch.zeros(2).long())],
                      validate=False).data_unit == "examples"
    V = _vectors(p_split.num_params)
    for Op in (cs.HessianOperator, cs.GGNOperator):
        a, b = Op(p_split) @ V, Op(p_merged) @ V
        assert float((a - b).norm() / b.norm()) < 1e-10
    # weighting batches by sequences instead of tokens is a different (wrong) matrix
    by_sequences = cs.Problem(model, loss, split, batch_size_fn=lambda y: int(y.shape[0]))
    wrong = cs.HessianOperator(by_sequences) @ V
    right = cs.HessianOperator(p_merged) @ V
    assert float((wrong - right).norm() / right.norm()) > 1e-3


def test_causal_lm_operators_match_dense_ground_truth():
    model, loss, data = _model(), cs.CausalLMLoss(), _batches()
    problem = cs.Problem(model, loss, data)
    # tied weights count once: the LM head adds no parameters of its own
    assert problem.num_params == sum(p.numel() for p in model.parameters())
    assert problem.num_params == VOCAB * D + 3 * D * D + 3 * D
    V = _vectors(problem.num_params)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    N = problem.num_data
    weighted = [(x, y) for x, y in data]
    sizes = [int((y[:, 1:] != -100).sum()) for _, y in data]

    def total_loss_weighting(out, y):  # dense helpers weight batches by n_b / N with n_b = len(y)
        return loss(out, y)

    with sdpa_kernel(SDPBackend.MATH):
        # dense_hessian weights by target.shape[0]; give it token weights through one batch each
        H = sum(n / N * dense_hessian(model, total_loss_weighting, [b]) for n, b in zip(sizes, weighted))
        G = sum(n / N * dense_ggn(model, total_loss_weighting, [b]) for n, b in zip(sizes, weighted))
    assert float((cs.HessianOperator(problem) @ V - H @ V).norm() / (H @ V).norm()) < 1e-12
    assert float((cs.GGNOperator(problem) @ V - G @ V).norm() / (G @ V).norm()) < 1e-12


def test_fisher_of_a_causal_lm_estimates_the_ggn():
    model, loss, data = _model(), cs.CausalLMLoss(), _batches()
    problem = cs.Problem(model, loss, data)
    V = _vectors(problem.num_params, 2)
    F_op = cs.FisherMCOperator(problem, mc_samples=400, seed=0)
    GV, FV = cs.GGNOperator(problem) @ V, F_op @ V
    assert float((FV - GV).norm() / GV.norm()) < 0.15


class TinyForCausalLM(TinyCausalLM):
    """Named like a HuggingFace causal LM: ModelOutputLoss counts shifted tokens by itself."""


@pytest.mark.parametrize("tokens", ["auto", "shifted"])
def test_model_output_loss_equals_the_loss_of_the_logits(tokens):
    data = [{"input_ids": x, "labels": y} for x, y in _batches()]
    torch.manual_seed(0)
    model = (TinyForCausalLM if tokens == "auto" else TinyCausalLM)(own_loss=True).double().eval()
    own = cs.Problem(model, cs.ModelOutputLoss(tokens=tokens), data)
    logits = cs.Problem(_model(), cs.CausalLMLoss(), data)
    assert own.num_data == logits.num_data == 20
    unshifted = cs.Problem(_model(own_loss=True), cs.ModelOutputLoss(tokens="labels"), data)
    assert unshifted.num_data == 25  # the labels that are not -100, before the shift
    V = _vectors(own.num_params)
    a, b = cs.HessianOperator(own) @ V, cs.HessianOperator(logits) @ V
    assert float((a - b).norm() / b.norm()) < 1e-12
    with pytest.raises(ValueError, match="CausalLMLoss"):
        cs.GGNOperator(own)


def test_model_output_loss_needs_dict_batches():
    with pytest.raises(TypeError, match="dicts with the key 'labels'"):
        cs.Problem(_model(own_loss=True), cs.ModelOutputLoss(), _batches())


def test_token_cross_entropy_checks_shapes():
    with pytest.raises(ValueError, match=r"logits \[n, T, V\]"):
        cs.CausalLMLoss()(torch.zeros(2, 5, 4), torch.zeros(2, 4, dtype=torch.long))
