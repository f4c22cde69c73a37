"""Attention kernels without second derivatives, the finite-difference engine, and what fails.

Ground truth: dense float64 Hessians / GGNs from :mod:`curvscope.testing.dense` (plain autograd,
run under the math SDPA backend with the Transformer fast path off), and central differences of
full-data gradients computed here with plain autograd.
"""

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import curvscope as cs
from curvscope.curvature._attention import fast_path_disabled
from curvscope.testing.dense import dense_ggn, dense_hessian


def rel(a, b):
    return float((a - b).norm() / b.norm())


@contextlib.contextmanager
def math_attention():
    with sdpa_kernel(SDPBackend.MATH), fast_path_disabled():
        yield


class RawSDPA(nn.Module):
    """Calls F.scaled_dot_product_attention on [B, heads, T, d] tensors (fused on the CPU)."""

    def __init__(self, d=8, heads=2, classes=3):
        super().__init__()
        self.heads, self.qkv, self.head = heads, nn.Linear(d, 3 * d), nn.Linear(d, classes)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, d)
        return self.head(torch.tanh(a).mean(1))


class EncoderClassifier(nn.Module):
    def __init__(self, d=8, classes=3):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(d, 2, 12, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


def _data(n=10, T=5, d=8, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, T, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return [(X[:4], y[:4]), (X[4:8], y[4:8]), (X[8:], y[8:])]


def _model(cls):
    torch.manual_seed(0)
    return cls().double().eval()


def _vectors(P, k=3, seed=1):
    return torch.randn(P, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("cls", [RawSDPA, EncoderClassifier])
def test_attention_models_hessian_and_ggn_match_dense_with_defaults(cls):
    model, data, loss = _model(cls), _data(), nn.CrossEntropyLoss()
    problem = cs.Problem(model, loss, data)
    V = _vectors(problem.num_params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        HV = cs.HessianOperator(problem) @ V
        GV = cs.GGNOperator(problem) @ V
        cs.HessianOperator(problem) @ V
    switched = [w for w in caught if issubclass(w.category, cs.AttentionBackendWarning)]
    assert len(switched) == 1  # said once per problem
    assert "MiB" in str(switched[0].message) and "SDPBackend.MATH" in str(switched[0].message)
    with math_attention():
        H = dense_hessian(model, loss, data)
        G = dense_ggn(model, loss, data)
    assert rel(HV, H @ V) < 1e-12
    assert rel(GV, G @ V) < 1e-12


def test_attention_switch_leaves_global_settings_and_model_as_they_were():
    model, data = _model(EncoderClassifier), _data()
    problem = cs.Problem(model, nn.CrossEntropyLoss(), data, attention="math")
    before = torch.backends.mha.get_fastpath_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("error", cs.AttentionBackendWarning)  # "math": silent
        cs.HessianOperator(problem) @ _vectors(problem.num_params, 1)
    assert torch.backends.mha.get_fastpath_enabled() == before
    assert not model.training


def test_native_attention_error_names_engine_module_and_fix():
    model, data = _model(EncoderClassifier), _data()
    problem = cs.Problem(model, nn.CrossEntropyLoss(), data, attention="native")
    H = cs.HessianOperator(problem, engine="double_backward")
    with pytest.raises(cs.CurvatureProductError) as info:
        H @ _vectors(problem.num_params, 1)
    text = str(info.value)
    assert "engine 'double_backward'" in text
    assert "MultiheadAttention 'encoder.self_attn'" in text
    assert "attention='auto'" in text and "engine='finite_difference'" in text


def test_attention_argument_is_checked():
    with pytest.raises(ValueError, match="attention must be one of"):
        cs.Problem(_model(RawSDPA), nn.CrossEntropyLoss(), _data(), attention="flash")


def test_auto_engine_takes_finite_differences_only_when_no_exact_engine_runs():
    model, data, loss = _model(RawSDPA), _data(), nn.CrossEntropyLoss()
    problem = cs.Problem(model, loss, data, attention="native")
    V = _vectors(problem.num_params)
    H = cs.HessianOperator(problem)
    with pytest.warns(cs.EngineFallbackWarning, match="finite_difference"):
        HV = H @ V
    assert H.active_engine == "finite_difference"
    assert H.last_error_estimate is not None and H.last_error_estimate.shape == (3,)
    with math_attention():
        ref = dense_hessian(model, loss, data) @ V
    err = (HV - ref).norm(dim=0)
    assert float((err / ref.norm(dim=0)).max()) < 1e-8
    assert bool((H.last_error_estimate >= err).all())  # the estimate covers the error
    # the GGN keeps working: J v by differences of outputs, J^T u by reverse mode (first order)
    with pytest.warns(cs.EngineFallbackWarning):
        GV = cs.GGNOperator(problem) @ V
    with math_attention():
        assert rel(GV, dense_ggn(model, loss, data) @ V) < 1e-8


def _tanh_mlp(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-8), (torch.float32, 2e-3)])
@pytest.mark.parametrize("richardson", [True, False])
def test_finite_difference_engine_against_exact(dtype, tol, richardson):
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(30, 5, generator=g), torch.randint(0, 3, (30,), generator=g)
    data64 = [(X[:16].double(), y[:16]), (X[16:].double(), y[16:])]
    exact = cs.HessianOperator(cs.Problem(_tanh_mlp(torch.float64), nn.CrossEntropyLoss(), data64))
    data = [(x.to(dtype), t) for x, t in data64]
    problem = cs.Problem(_tanh_mlp(dtype), nn.CrossEntropyLoss(), data)
    V = _vectors(problem.num_params, 4)
    H = cs.HessianOperator(problem, engine="finite_difference", richardson=richardson)
    HV, est = H.matmat_with_error(V.to(dtype))
    ref = exact @ V
    err = (HV.double() - ref).norm(dim=0)
    assert float((err / ref.norm(dim=0)).max()) < tol
    assert est is not None and bool((est > 0).all())
    if richardson:
        assert bool((est >= err).all())
    assert H.num_matvecs == 4 and problem.num_data_passes >= 1


class DetachedTanh(torch.autograd.Function):
    """tanh whose backward is computed from a detached input: first derivative right, second wrong."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (1 - torch.tanh(x.detach()) ** 2)


class CustomFunctionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(DetachedTanh.apply(self.a(x)))


def _fd_reference(model, loss_fn, data, V, h=1e-4):
    """Central differences (Richardson) of the full-data gradient, plain autograd."""
    names = [n for n, _ in model.named_parameters()]
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    N = sum(len(t) for _, t in data)

    def grad_at(flat):
        leaves, off = {}, 0
        for n in names:
            k = theta[n].numel()
            leaves[n] = (theta[n] + flat[off:off + k].view_as(theta[n])).requires_grad_(True)
            off += k
        total = sum(len(t) / N * loss_fn(torch.func.functional_call(model, leaves, (x,)), t)
                    for x, t in data)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, list(leaves.values()))])

    cols = []
    for j in range(V.shape[1]):
        d = [(grad_at(s * V[:, j]) - grad_at(-s * V[:, j])) / (2 * s) for s in (h, h / 2)]
        cols.append((4 * d[1] - d[0]) / 3)
    return torch.stack(cols, 1)


def test_auto_engine_catches_a_silently_wrong_double_backward():
    """torch's double backward through this custom Function returns a wrong Hessian without an
    error; ``auto`` checks its exact engine against finite differences once and switches."""
    torch.manual_seed(0)
    model = CustomFunctionNet().double()
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)
    data, loss = [(X[:8], y[:8]), (X[8:], y[8:])], nn.CrossEntropyLoss()
    problem = cs.Problem(model, loss, data)
    V = _vectors(problem.num_params, 2)
    ref = _fd_reference(model, loss, data, V)
    wrong = cs.HessianOperator(problem, engine="double_backward") @ V
    assert rel(wrong, ref) > 1e-2  # what torch gives silently
    H = cs.HessianOperator(problem)
    with pytest.warns(cs.EngineMismatchWarning, match="disagrees with finite differences"):
        HV = H @ V
    assert H.active_engine == "finite_difference"
    assert rel(HV, ref) < 1e-7


def test_auto_engine_check_passes_on_a_correct_model():
    model, data = _tanh_mlp(torch.float64), [(torch.randn(8, 5, dtype=torch.float64),
                                              torch.randint(0, 3, (8,)))]
    problem = cs.Problem(model, nn.CrossEntropyLoss(), data)
    H = cs.HessianOperator(problem)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        H @ _vectors(problem.num_params, 2)
    assert H.active_engine == "auto"


def test_torch_compiled_model_is_analysed_through_its_original_module():
    model, data = _tanh_mlp(torch.float64), [(torch.randn(8, 5, dtype=torch.float64),
                                              torch.randint(0, 3, (8,)))]
    compiled = torch.compile(model)
    a = cs.Problem(compiled, nn.CrossEntropyLoss(), data)
    V = _vectors(a.num_params, 2)
    HV = cs.HessianOperator(a) @ V
    # the same kernels as a's (two fresh engine="auto" trials may pick kernels that differ in
    # the last bits where they cost the same): then the products are bitwise the same
    b = cs.Problem(model, nn.CrossEntropyLoss(), data, engine_choices=a.engine_choices)
    assert a.num_params == b.num_params
    assert torch.equal(HV, cs.HessianOperator(b) @ V)


class OldStyleSquare(torch.autograd.Function):
    """No setup_context (torch.func cannot transform it) and a once-differentiable backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class OldStyleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return OldStyleSquare.apply(self.lin(x))


def test_ggn_of_a_model_torch_func_cannot_transform():
    """J^T u by plain autograd, J v by output differences; torch would return J v = 0 silently
    through the once-differentiable backward, which curvscope refuses."""
    torch.manual_seed(0)
    model = OldStyleNet().double()
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(12, 4, generator=g, dtype=torch.float64), torch.arange(12) % 3
    data, loss = [(X[:8], y[:8]), (X[8:], y[8:])], nn.CrossEntropyLoss()
    problem = cs.Problem(model, loss, data)
    V = _vectors(problem.num_params, 2)
    with pytest.warns(cs.EngineFallbackWarning):
        GV = cs.GGNOperator(problem) @ V
    names = [n for n, _ in model.named_parameters()]
    theta = tuple(p.detach() for p in model.parameters())
    ref = torch.zeros_like(GV)
    for x, t in data:
        def f(*ps, x=x):
            return torch.func.functional_call(model, dict(zip(names, ps)), (x,)).reshape(-1)

        J = torch.cat([j.reshape(len(t) * 3, -1) for j in torch.autograd.functional.jacobian(f, theta)], 1)
        z = f(*theta).detach()
        Hl = torch.autograd.functional.hessian(lambda zz, t=t: loss(zz.view(-1, 3), t), z)
        ref += len(t) / 12 * J.T @ Hl @ J @ V
    assert rel(GV, ref) < 1e-8
