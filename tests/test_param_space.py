"""Tests of ParamSpace (flat <-> per-parameter maps) and select_parameters."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from curvscope.curvature import ParamSpace, select_parameters

F64 = torch.float64
CPU = torch.device("cpu")

NAMES = ("w", "b", "s", "t")
SHAPES = ((2, 3), (2,), (), (3, 1, 2))
NUMELS = (6, 2, 1, 6)
OFFSETS = (0, 6, 8, 9)
P = 15


@pytest.fixture
def space() -> ParamSpace:
    return ParamSpace(NAMES, SHAPES, F64, CPU)


def flat(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.block = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
        self.temperature = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):  # pragma: no cover - not called
        return self.block(torch.tanh(self.fc1(x))) * self.temperature


MODEL_NAMES = [  # a module's own parameters come before its children's
    "temperature",
    "fc1.weight",
    "fc1.bias",
    "block.0.weight",
    "block.0.bias",
    "block.2.weight",
    "block.2.bias",
]


@pytest.fixture
def model() -> Net:
    torch.manual_seed(0)
    return Net().double()


# ----------------------------------------------------------------------------- sizes
def test_sizes_offsets_numels(space):
    assert space.numels == NUMELS
    assert space.offsets == OFFSETS
    assert space.size == P
    assert len(space) == 4
    assert space.names == NAMES
    assert space.shapes == SHAPES


def test_blocks(space):
    blocks = space.blocks()
    assert list(blocks) == list(NAMES)
    assert blocks == {"w": slice(0, 6), "b": slice(6, 8), "s": slice(8, 9), "t": slice(9, 15)}
    v = flat(P)
    parts = space.split(v)
    for name, sl in blocks.items():
        assert torch.equal(v[sl], parts[name].reshape(-1))


# ----------------------------------------------------------------------------- split / join
def test_split_vector_layout_and_round_trip(space):
    v = flat(P, seed=1)
    parts = space.split(v)
    assert list(parts) == list(NAMES)
    for name, shape, off, n in zip(NAMES, SHAPES, OFFSETS, NUMELS):
        assert parts[name].shape == shape
        assert torch.equal(parts[name], v[off : off + n].reshape(shape))  # row-major
    assert parts["s"].ndim == 0
    assert torch.equal(space.join(parts), v)
    assert torch.equal(space.join([parts[n] for n in NAMES]), v)  # a sequence works too
    assert torch.equal(space.join(tuple(parts[n] for n in NAMES)), v)
    # a dict in a different order is joined in the space's order
    shuffled = {n: parts[n] for n in reversed(NAMES)}
    assert torch.equal(space.join(shuffled), v)


def test_split_matrix_layout_and_round_trip(space):
    k = 4
    V = flat(P, k, seed=2)
    parts = space.split(V)
    for name, shape, off, n in zip(NAMES, SHAPES, OFFSETS, NUMELS):
        assert parts[name].shape == (k, *shape)
        for j in range(k):
            assert torch.equal(parts[name][j], V[off : off + n, j].reshape(shape))
    joined = space.join(parts, batched=True)
    assert joined.shape == (P, k)
    assert torch.equal(joined, V)
    # column j of the split equals the split of column j
    for j in range(k):
        col = space.split(V[:, j].contiguous())
        for name in NAMES:
            assert torch.equal(parts[name][j], col[name])
    # split(join(parts)) is again the same parts
    again = space.split(joined)
    for name in NAMES:
        assert torch.equal(again[name], parts[name])


def test_split_k_equals_one(space):
    V = flat(P, 1, seed=3)
    parts = space.split(V)
    assert parts["w"].shape == (1, 2, 3)
    assert torch.equal(space.join(parts, batched=True), V)


def test_split_vector_returns_views(space):
    v = torch.zeros(P, dtype=F64)
    parts = space.split(v)
    for i, name in enumerate(NAMES):
        parts[name].fill_(i + 1.0)
    expected = torch.cat([torch.full((n,), i + 1.0, dtype=F64) for i, n in enumerate(NUMELS)])
    assert torch.equal(v, expected)
    parts["w"][1, 2] = -7.0
    assert v[5].item() == -7.0
    parts["t"][2, 0, 1] = -9.0
    assert v[9 + 5].item() == -9.0


def test_split_matrix_returns_views(space):
    k = 3
    V = torch.zeros(P, k, dtype=F64)
    parts = space.split(V)
    for i, name in enumerate(NAMES):
        parts[name].fill_(i + 1.0)
    expected = torch.cat([torch.full((n, k), i + 1.0, dtype=F64) for i, n in enumerate(NUMELS)])
    assert torch.equal(V, expected)
    parts["w"][2, 1, 0] = -5.0  # column 2, entry (1, 0) of w = flat index 3
    assert V[3, 2].item() == -5.0
    parts["s"][1] = -6.0
    assert V[8, 1].item() == -6.0
    parts["t"][0, 1, 0, 1] = -8.0  # entry (1, 0, 1) of t = flat index 9 + 3
    assert V[12, 0].item() == -8.0


def test_split_errors(space):
    with pytest.raises(TypeError, match=r"expected a torch\.Tensor of shape \[15\], got list"):
        space.split([0.0] * P)
    for shape in [(P + 1,), (P - 1, 2), (P, 2, 1), ()]:
        msg = re.escape(
            f"expected a flat vector [{P}] or matrix [{P}, k] over the parameters "
            f"['w', 'b', 's', 't'], got shape {shape}"
        )
        with pytest.raises(ValueError, match=msg):
            space.split(torch.zeros(shape, dtype=F64))


def test_join_errors(space):
    parts = space.split(flat(P))
    with pytest.raises(ValueError, match="expected 4 tensors, got 3"):
        space.join([parts["w"], parts["b"], parts["s"]])
    with pytest.raises(KeyError):
        space.join({n: parts[n] for n in ("w", "b", "s")})


def test_long_names_are_shortened_in_errors():
    names = tuple(f"p{i}" for i in range(6))
    sp = ParamSpace(names, ((1,),) * 6, F64, CPU)
    with pytest.raises(ValueError, match=re.escape("over the parameters ['p0', ..., 'p5']")):
        sp.split(torch.zeros(7, dtype=F64))


# ----------------------------------------------------------------------------- index_of
def test_index_of_equals_concatenated_slices(space):
    blocks = space.blocks()
    ar = torch.arange(P)
    for sub_names in [("s", "w"), ("t",), ("b", "t", "w"), NAMES]:
        sub = ParamSpace(sub_names, tuple(SHAPES[NAMES.index(n)] for n in sub_names), F64, CPU)
        idx = space.index_of(sub)
        expected = torch.cat([ar[blocks[n]] for n in sub_names])
        assert idx.dtype == torch.int64
        assert torch.equal(idx, expected)
        # indexing a flat vector with it gives the sub-space's flat vector
        v = flat(P, seed=4)
        parts = space.split(v)
        assert torch.equal(v[idx], sub.join({n: parts[n] for n in sub_names}))
    assert torch.equal(space.index_of(space), ar)


def test_index_of_on_a_model(model):
    full = ParamSpace.from_tensors(select_parameters(model, None))
    sub = ParamSpace.from_tensors(select_parameters(model, model.block))
    idx = full.index_of(sub)
    assert torch.equal(idx, torch.arange(1 + 12 + 4, 1 + 12 + 4 + 16 + 4 + 8 + 2))
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    theta_sub = torch.cat([p.detach().reshape(-1) for p in model.block.parameters()])
    assert torch.equal(theta[idx], theta_sub)


def test_index_of_unknown_names(space):
    other = ParamSpace(("w", "zz"), ((2, 3), (1,)), F64, CPU)
    with pytest.raises(ValueError, match=re.escape("parameters ['zz'] are not in this space")):
        space.index_of(other)


# ----------------------------------------------------------------------------- from_tensors
def test_from_tensors(model):
    params = dict(model.named_parameters())
    sp = ParamSpace.from_tensors(params)
    assert sp.names == tuple(MODEL_NAMES)
    assert sp.shapes == ((), (4, 3), (4,), (4, 4), (4,), (2, 4), (2,))
    assert sp.dtype == F64
    assert sp.device == CPU
    assert sp.size == sum(p.numel() for p in model.parameters())
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(sp.join({n: p.detach() for n, p in params.items()}), theta)


def test_from_tensors_empty():
    with pytest.raises(ValueError, match="no parameters selected"):
        ParamSpace.from_tensors({})


def test_from_tensors_mixed_dtypes():
    msg = re.escape("share one dtype and device, got dtypes ['torch.float32', 'torch.float64']")
    with pytest.raises(ValueError, match=msg):
        ParamSpace.from_tensors({"a": torch.zeros(2, dtype=F64), "b": torch.zeros(3)})


def test_from_tensors_mixed_devices():
    with pytest.raises(ValueError, match=r"devices \['cpu', 'meta'\]"):
        ParamSpace.from_tensors(
            {"a": torch.zeros(2, dtype=F64), "b": torch.zeros(3, dtype=F64, device="meta")}
        )


# ----------------------------------------------------------------------------- select_parameters
def test_select_none_takes_trainable_parameters_in_model_order(model):
    chosen = select_parameters(model, None)
    assert list(chosen) == MODEL_NAMES
    named = dict(model.named_parameters())
    assert all(chosen[n] is named[n] for n in chosen)
    model.block[0].bias.requires_grad_(False)
    model.temperature.requires_grad_(False)
    chosen = select_parameters(model, None)
    assert list(chosen) == [n for n in MODEL_NAMES if n not in ("block.0.bias", "temperature")]


def test_select_list_of_names_follows_model_order(model):
    chosen = select_parameters(model, ["temperature", "block.2.weight", "fc1.bias"])
    assert list(chosen) == ["temperature", "fc1.bias", "block.2.weight"]
    assert chosen["fc1.bias"] is model.fc1.bias
    assert list(select_parameters(model, ("block.0.bias", "fc1.weight"))) == [
        "fc1.weight",
        "block.0.bias",
    ]
    assert list(select_parameters(model, (n for n in ["fc1.weight", "temperature"]))) == [
        "temperature",
        "fc1.weight",
    ]
    # names that are regex-like are matched literally in a list
    assert list(select_parameters(model, ["fc1.weight"])) == ["fc1.weight"]


def test_select_regex_string_uses_search(model):
    assert list(select_parameters(model, r"^block\.\d+\.weight$")) == [
        "block.0.weight",
        "block.2.weight",
    ]
    assert list(select_parameters(model, "bias")) == ["fc1.bias", "block.0.bias", "block.2.bias"]
    assert list(select_parameters(model, "temperature")) == ["temperature"]


def test_select_compiled_regex_keeps_flags(model):
    chosen = select_parameters(model, re.compile(r"^FC1\.", re.IGNORECASE))
    assert list(chosen) == ["fc1.weight", "fc1.bias"]
    assert list(select_parameters(model, re.compile(r"2\.(weight|bias)$"))) == [
        "block.2.weight",
        "block.2.bias",
    ]


def test_select_submodule(model):
    chosen = select_parameters(model, model.block)
    assert list(chosen) == ["block.0.weight", "block.0.bias", "block.2.weight", "block.2.bias"]
    assert chosen["block.2.weight"] is model.block[2].weight
    assert list(select_parameters(model, model)) == MODEL_NAMES


def test_select_list_of_submodules_follows_model_order(model):
    chosen = select_parameters(model, [model.block[2], model.fc1])
    assert list(chosen) == ["fc1.weight", "fc1.bias", "block.2.weight", "block.2.bias"]
    assert list(select_parameters(model, (model.block[0],))) == ["block.0.weight", "block.0.bias"]
    # overlapping modules do not duplicate parameters
    assert list(select_parameters(model, [model.block, model.block[0]])) == [
        "block.0.weight",
        "block.0.bias",
        "block.2.weight",
        "block.2.bias",
    ]


def test_select_unknown_name(model):
    with pytest.raises(ValueError, match=re.escape("unknown parameter names ['nope', 'fc3.weight']")):
        select_parameters(model, ["fc1.weight", "nope", "fc3.weight"])


def test_select_regex_matching_nothing(model):
    with pytest.raises(ValueError, match="the regex 'conv' matches no parameter name"):
        select_parameters(model, "conv")
    with pytest.raises(ValueError, match="matches no parameter name"):
        select_parameters(model, re.compile(r"^weight"))


def test_select_module_not_in_model(model):
    with pytest.raises(ValueError, match="not submodules of the model"):
        select_parameters(model, nn.Linear(3, 4))
    with pytest.raises(ValueError, match="hold no parameter of the model"):
        select_parameters(model, [model.block[1]])  # Tanh: no parameters
    with pytest.raises(ValueError, match="hold no parameter of the model"):
        select_parameters(model, model.block[1])  # Tanh: no parameters


def test_select_list_with_one_foreign_module(model):
    with pytest.raises(ValueError, match=r"modules \['Linear'\] are not submodules of the model"):
        select_parameters(model, [model.fc1, nn.Linear(3, 4)])
    with pytest.raises(ValueError, match="not submodules of the model"):
        select_parameters(model, [nn.Linear(3, 4), nn.Linear(2, 2)])


def test_select_frozen_parameter(model):
    model.fc1.bias.requires_grad_(False)
    msg = re.escape("selected parameters ['fc1.bias'] have requires_grad=False")
    with pytest.raises(ValueError, match=msg):
        select_parameters(model, ["fc1.weight", "fc1.bias"])
    with pytest.raises(ValueError, match=msg):
        select_parameters(model, "fc1")
    with pytest.raises(ValueError, match=msg):
        select_parameters(model, model.fc1)
    # selections that avoid the frozen parameter are fine
    assert list(select_parameters(model, ["fc1.weight"])) == ["fc1.weight"]
    assert list(select_parameters(model, "weight$")) == [
        "fc1.weight",
        "block.0.weight",
        "block.2.weight",
    ]


@pytest.mark.parametrize(
    ("selection", "match"),
    [
        (3, "got int"),
        (2.5, "got float"),
        ([1, 2], re.escape("got a list of ['int']")),
        (["fc1.weight", 0], re.escape("got a list of ['int', 'str']")),
        ([nn.Linear(1, 1), "fc1.weight"], "got a list of"),
    ],
    ids=["int", "float", "list-of-ints", "mixed-names-ints", "mixed-modules-names"],
)
def test_select_wrong_type(model, selection, match):
    with pytest.raises(TypeError, match=match):
        select_parameters(model, selection)


def test_select_model_without_trainable_parameters(model):
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="the model has no parameter with requires_grad=True"):
        select_parameters(model, None)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        select_parameters(nn.Tanh(), None)
