"""Bad input that torch lets through or explains badly: each gets a one-line message with the fix.

Broadcasting targets of element-wise losses, class-index targets that do not fit cross-entropy,
models on the meta device or on two dtypes / devices, and torchrun without a process group.
"""

import functools
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvscope as cs
from curvscope import distributed
from curvscope.curvature._input_checks import check_target_shape
from curvscope.testing import tiny_mlp

F64 = torch.float64


def _regression(out_dim=1, target_shape=None, sigmoid=False, n=(5, 5, 3)):
    torch.manual_seed(0)
    layers = [nn.Linear(4, out_dim)] + ([nn.Sigmoid()] if sigmoid else [])
    model = nn.Sequential(*layers).double()
    g = torch.Generator().manual_seed(1)
    batches = []
    for size in n:
        x = torch.randn(size, 4, dtype=F64, generator=g)
        shape = target_shape(size) if target_shape else (size, out_dim)
        batches.append((x, torch.rand(shape, dtype=F64, generator=g)))
    return model, batches


def _one_line(err):
    text = str(err.value)
    assert len(text.splitlines()) == 1, text
    return text


ELEMENTWISE = {
    "nn.MSELoss": (nn.MSELoss(), "MSELoss", False),
    "F.mse_loss": (F.mse_loss, "F.mse_loss", False),
    "nn.L1Loss": (nn.L1Loss(), "L1Loss", False),
    "F.l1_loss": (F.l1_loss, "F.l1_loss", False),
    "nn.SmoothL1Loss": (nn.SmoothL1Loss(), "SmoothL1Loss", False),
    "F.smooth_l1_loss": (F.smooth_l1_loss, "F.smooth_l1_loss", False),
    "nn.HuberLoss": (nn.HuberLoss(), "HuberLoss", False),
    "F.huber_loss": (F.huber_loss, "F.huber_loss", False),
    "nn.BCEWithLogitsLoss": (nn.BCEWithLogitsLoss(), "BCEWithLogitsLoss", False),
    "F.binary_cross_entropy_with_logits": (F.binary_cross_entropy_with_logits,
                                           "F.binary_cross_entropy_with_logits", False),
    "nn.BCELoss": (nn.BCELoss(), "BCELoss", True),
    "F.binary_cross_entropy": (F.binary_cross_entropy, "F.binary_cross_entropy", True),
    "partial(F.huber_loss, delta=0.5)": (functools.partial(F.huber_loss, delta=0.5), "F.huber_loss",
                                         False),
}


# ----------------------------------------------------------------------------- element-wise losses
@pytest.mark.parametrize("key", ELEMENTWISE)
def test_broadcasting_target_of_an_elementwise_loss_is_refused(key):
    """Output [N, 1] and target [N] broadcast to [N, N]: refused with both shapes and the fix."""
    loss_fn, name, sigmoid = ELEMENTWISE[key]
    model, batches = _regression(1, target_shape=lambda n: (n,), sigmoid=sigmoid)
    with pytest.raises(ValueError) as err:
        cs.Problem(model, loss_fn, batches)
    text = _one_line(err)
    assert text.startswith(f"{name} compares output and target element by element"), text
    assert "needs a target of the output's shape [5, 1], got target [5]" in text
    assert "torch would broadcast the pair to [5, 5]: a wrong loss" in text
    assert "output_fn=lambda out: out.squeeze(-1)" in text and "target.view_as(output)" in text


@pytest.mark.parametrize("key", ["nn.MSELoss", "nn.BCELoss", "F.l1_loss"])
def test_matching_shapes_pass_and_the_documented_fixes_work(key):
    loss_fn, _, sigmoid = ELEMENTWISE[key]
    model, batches = _regression(1, sigmoid=sigmoid)  # target [N, 1] like the output
    assert cs.Problem(model, loss_fn, batches).num_data == 13
    model, batches = _regression(1, target_shape=lambda n: (n,), sigmoid=sigmoid)
    squeezed = cs.Problem(model, loss_fn, batches, output_fn=lambda out: out.squeeze(-1))
    reshaped = cs.Problem(model, loss_fn, [(x, y.view(-1, 1)) for x, y in batches])
    V = torch.randn(squeezed.num_params, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cs.GGNOperator(squeezed) @ V, cs.GGNOperator(reshaped) @ V)


def test_target_with_the_same_number_of_elements_gets_a_reshape():
    model, batches = _regression(1, target_shape=lambda n: (n, 1, 1))
    with pytest.raises(ValueError) as err:
        cs.Problem(model, nn.MSELoss(), batches)
    text = _one_line(err)
    assert "output's shape [5, 1], got target [5, 1, 1] (torch would broadcast the pair to [5, 5, 1]" in text
    assert "target.view_as(output), i.e. target.reshape(-1, 1)" in text


def test_class_labels_given_to_mse_are_refused():
    model, batches = _regression(3)
    labels = [(x, torch.arange(len(x)) % 3) for x, _ in batches]
    with pytest.raises(ValueError) as err:
        cs.Problem(model, nn.MSELoss(), labels)
    text = _one_line(err)
    assert "needs a target of the output's shape [5, 3], got target [5] (the shapes do not even " \
           "broadcast)" in text
    assert "for class labels use nn.CrossEntropyLoss, or one-hot encode them" in text


def test_user_losses_are_not_inspected():
    """A lambda or a subclass with its own forward may reshape as it likes."""
    model, batches = _regression(1, target_shape=lambda n: (n,))

    class Squeezing(nn.MSELoss):
        def forward(self, output, target):
            return super().forward(output.squeeze(-1), target)

    for loss_fn in (lambda out, y: F.mse_loss(out.squeeze(-1), y), Squeezing()):
        assert cs.Problem(model, loss_fn, batches).num_data == 13
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's own broadcasting warning
        assert cs.Problem(model, lambda out, y: F.mse_loss(out, y), batches).num_data == 13


def test_check_target_shape_skips_non_tensors_and_unknown_losses():
    check_target_shape(nn.MSELoss(), torch.zeros(3, 1), {"y": torch.zeros(3)})
    check_target_shape(nn.KLDivLoss(), torch.zeros(3, 1), torch.zeros(3))
    with pytest.raises(ValueError, match=r"^MSELoss compares output and target element by element"):
        check_target_shape(nn.MSELoss(), torch.zeros(3, 1), torch.zeros(3))


# ----------------------------------------------------------------------------- cross-entropy
def _classifier(out_shape=None):
    tp = tiny_mlp("classification")
    model = tp.model
    if out_shape is not None:
        model = nn.Sequential(model, nn.Unflatten(1, out_shape))
    return model, tp.batches


def test_cross_entropy_target_with_a_trailing_one():
    model, batches = _classifier()
    column = [(x, y.unsqueeze(1)) for x, y in batches]
    with pytest.raises(ValueError) as err:
        cs.Problem(model, nn.CrossEntropyLoss(), column)
    assert _one_line(err) == (
        "CrossEntropyLoss with class-index targets needs target [5] for output [5, 3] ([N, C] -> "
        "[N], [N, C, d1, ...] -> [N, d1, ...]), got target [5, 1]; drop the trailing 1 with "
        "target.squeeze(-1) in batch_fn."
    )


def test_cross_entropy_one_hot_and_wrong_length_and_nll():
    model, batches = _classifier()
    onehot = [(x, F.one_hot(y, 3)) for x, y in batches]
    with pytest.raises(ValueError) as err:
        cs.Problem(model, F.cross_entropy, onehot)
    assert "F.cross_entropy with class-index targets needs target [5] for output [5, 3]" in _one_line(err)
    assert "got target [5, 3]; the target looks one-hot: pass class indices (target.argmax(1))" in \
        str(err.value)
    short = [(x, y[:-1]) for x, y in batches]
    with pytest.raises(ValueError) as err:
        cs.Problem(model, nn.NLLLoss(), short)
    assert "NLLLoss with class-index targets needs target [5] for output [5, 3]" in _one_line(err)
    assert "got target [4]; give one class index per output row" in str(err.value)


def test_cross_entropy_with_classes_in_the_last_dim():
    """A sequence model's [N, T, C] output with [N, T] targets: the classes must be dim 1."""
    model, batches = _classifier(out_shape=(1, 3))  # output [N, 1, 3]: T = 1, C = 3 last
    tokens = [(x, y.unsqueeze(1)) for x, y in batches]
    with pytest.raises(ValueError) as err:
        cs.Problem(model, nn.CrossEntropyLoss(), tokens)
    text = _one_line(err)
    assert "needs target [5, 3] for output [5, 1, 3]" in text and "got target [5, 1]" in text
    assert "the classes must be dim 1, not the last dim" in text
    assert "output_fn=lambda out: out.movedim(-1, 1)" in text
    fixed = cs.Problem(model, nn.CrossEntropyLoss(), tokens, output_fn=lambda out: out.movedim(-1, 1))
    assert fixed.num_data == 13


def test_cross_entropy_probabilities_of_the_wrong_shape():
    model, batches = _classifier()
    floats = [(x, y.to(F64)) for x, y in batches]
    with pytest.raises(ValueError) as err:
        cs.Problem(model, nn.CrossEntropyLoss(), floats)
    assert _one_line(err) == (
        "CrossEntropyLoss reads a floating target as class probabilities of the output's shape "
        "[5, 3], got target [5]; pass class indices as an integer tensor (target.long()) or "
        "probabilities of the output's shape."
    )
    probs = [(x, F.one_hot(y, 3).to(F64)) for x, y in batches]  # the right shape: accepted
    assert cs.Problem(model, nn.CrossEntropyLoss(), probs).num_data == 13


# ----------------------------------------------------------------------------- meta, dtypes, devices
def test_model_on_the_meta_device():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    batches = tiny_mlp().batches
    with pytest.raises(ValueError) as err:
        cs.Problem(model, nn.CrossEntropyLoss(), batches)
    assert _one_line(err) == (
        "the model's tensors ['0.weight', '0.bias', '2.weight', '2.bias'] are on the meta device "
        "(shapes only, no values), expected real tensors; materialise the model with "
        "model.to_empty(device='cpu') (or 'cuda') and then load its weights with "
        "model.load_state_dict(...), or build it on a real device."
    )
    # the documented fix
    model.to_empty(device="cpu").load_state_dict(tiny_mlp().model.float().state_dict())
    assert cs.Problem(model.double(), nn.CrossEntropyLoss(), batches).num_params == 4 * 6 + 6 + 6 * 3 + 3


def test_model_partly_on_meta_names_the_meta_parameters_not_two_devices():
    model = tiny_mlp().model
    model[2].to_empty(device="meta")
    with pytest.raises(ValueError) as err:
        cs.Problem(model, nn.CrossEntropyLoss(), tiny_mlp().batches)
    text = _one_line(err)
    assert text.startswith("the model's tensors ['2.weight', '2.bias'] are on the meta device"), text
    assert "model.to_empty(device='cpu')" in text and "share one dtype" not in text


def test_model_with_two_dtypes():
    model = tiny_mlp().model
    model[2].float()
    with pytest.raises(ValueError) as err:
        cs.Problem(model, nn.CrossEntropyLoss(), tiny_mlp().batches)
    assert _one_line(err) == (
        "all selected parameters must share one dtype and device, got dtypes ['torch.float32', "
        "'torch.float64'] and devices ['cpu'] (torch.float64 on cpu: ['0.weight', '0.bias']; "
        "torch.float32 on cpu: ['2.weight', '2.bias']); convert the model with "
        "model.to(dtype=..., device=...)."
    )


def test_two_device_message_lists_the_parameters_of_each_device():
    params = {f"w{i}": torch.zeros(2, dtype=F64) for i in range(5)} | {"m": torch.zeros(3, dtype=F64,
                                                                                      device="meta")}
    with pytest.raises(ValueError) as err:
        cs.ParamSpace.from_tensors(params)
    assert "devices ['cpu', 'meta'] (torch.float64 on cpu: ['w0', 'w1', '... (5 in all)']; " \
           "torch.float64 on meta: ['m'])" in _one_line(err)


# ----------------------------------------------------------------------------- torchrun, no group
def test_no_torchrun_environment_changes_nothing(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.ensure_process_group() == (0, 1)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node=1
    assert distributed.ensure_process_group() == (0, 1)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("uncaught", [False, True])
def test_the_group_curvscope_made_is_torn_down_at_exit(monkeypatch, tmp_path, uncaught):
    """The exit handler destroys its own group; it meets the other ranks only on a clean exit."""
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    barriers = []
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: barriers.append(1))
    if uncaught:
        monkeypatch.setattr(sys, "last_value", RuntimeError("a rank failed"), raising=False)
    try:
        other = object()  # a group the script made itself is left alone
        distributed._tear_down_the_group_we_made(other)
        assert torch.distributed.is_initialized() and barriers == []
        distributed._tear_down_the_group_we_made(torch.distributed.group.WORLD)
        assert not torch.distributed.is_initialized()
        assert barriers == ([] if uncaught else [1])
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_torchrun_environment_whose_rendezvous_fails(monkeypatch):
    """WORLD_SIZE=2 without MASTER_ADDR: a RuntimeError that says what to do, not a lone rank."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    tp = tiny_mlp()
    with pytest.raises(RuntimeError) as err:
        cs.Problem(tp.model, tp.loss_fn, tp.batches)
    text = _one_line(err)
    assert text.startswith(
        "the environment says this is rank 0 of WORLD_SIZE=2 (torchrun), but torch.distributed is "
        "not initialised and initialising it from the environment failed (ValueError: "), text
    assert "MASTER_ADDR" in text
    assert text.endswith("; call torch.distributed.init_process_group() (or "
                         "curvscope.distributed.init_from_env()) at the top of the script, or run "
                         "one process without torchrun.")
    assert not torch.distributed.is_initialized()


def test_malformed_world_size(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(RuntimeError, match=re.escape(
            "WORLD_SIZE must be an integer (torchrun sets it), got 'two'; launch with torchrun")):
        distributed.ensure_process_group()


WORKER = """
import atexit
import os
import sys
import warnings

import torch
import torch.distributed as dist

import curvscope as cs
from curvscope.distributed import world
from curvscope.testing import tiny_mlp

torch.set_num_threads(1)
assert not dist.is_initialized()
# atexit runs last-registered first: this runs after curvscope's teardown of the group it made
atexit.register(lambda: open(f"{sys.argv[1]}/exit{os.environ['RANK']}.txt", "w").write(
    str(dist.is_initialized())))
tp = tiny_mlp("classification", batch_sizes=(5, 5, 3, 4, 2))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    problem = cs.Problem(tp.model, tp.loss_fn, tp.batches)  # no init_process_group
V = torch.randn(problem.num_params, 3, dtype=torch.float64,
                generator=torch.Generator().manual_seed(0))
rank, size = world()
torch.save({"world": (rank, size), "initialized": dist.is_initialized(),
            "num_data": problem.num_data, "indices": [b.index for b in problem.batches()],
            "HV": cs.HessianOperator(problem) @ V, "warnings": [str(w.message) for w in caught]},
           f"{sys.argv[1]}/rank{rank}.pt")
# no destroy_process_group(): the script never made the group; curvscope tears it down at exit
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_torchrun_without_init_process_group_shards_the_batches(tmp_path):
    """Each rank keeps its round-robin share; products and counts are those of one process."""
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-8000:]
    assert time.perf_counter() - start < 60
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    tp = tiny_mlp("classification", batch_sizes=(5, 5, 3, 4, 2))
    one = cs.Problem(tp.model, tp.loss_fn, tp.batches)
    V = torch.randn(one.num_params, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    HV = cs.HessianOperator(one) @ V
    for r, got in enumerate(ranks):
        assert got["world"] == (r, 2) and got["initialized"]
        assert got["num_data"] == one.num_data == 19
        assert got["indices"] == [[0, 2, 4], [1, 3]][r]
        torch.testing.assert_close(got["HV"], HV, rtol=1e-10, atol=1e-12)
        assert any(w.startswith(f"curvscope initialised torch.distributed from the environment (rank "
                                f"{r} of 2, backend gloo): the script did not call "
                                "init_process_group(); batches are sharded over the ranks.")
                   for w in got["warnings"]), got["warnings"]
        assert (tmp_path / f"exit{r}.txt").read_text() == "False"  # the group is gone at exit
