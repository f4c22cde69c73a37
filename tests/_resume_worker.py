"""A long run for the resume tests: SLQ or eigsh on a tiny network's Hessian, with checkpoints.

Usage: python tests/_resume_worker.py {slq|eigsh} CHECKPOINT OUT [DELAY]
Sleeps DELAY seconds after every product so the test can SIGKILL it mid-way.
"""

import sys
import time

import torch

import curvscope as cs
from curvscope.linops import LinearOperator
from curvscope.testing import tiny_mlp


class Slow(LinearOperator):
    def __init__(self, A, delay):
        super().__init__(A.shape, dtype=A.dtype, device=A.device, tags=A.tags)
        self.A, self.delay = A, delay

    def children(self):
        return (self.A,)

    def _matmat(self, X):
        out = self.A @ X
        time.sleep(self.delay)
        return out


def run(kind, checkpoint, delay=0.0, engine_choices=None):
    """The run; ``engine_choices`` replays another run's kernels (``engine="auto"`` trials
    otherwise). The kernels used come back under ``"engines"``.
    """
    torch.set_num_threads(1)
    tp = tiny_mlp("classification")
    problem = cs.Problem(tp.model, tp.loss_fn, tp.batches)
    problem.engine_choices.update(engine_choices or {})
    H = Slow(cs.HessianOperator(problem), delay)
    g = torch.Generator().manual_seed(7)
    if kind == "slq":
        d = cs.slq(H, 3, 40, generator=g, checkpoint=checkpoint, checkpoint_every=4)
        return {"nodes": d.nodes, "weights": d.weights, "engines": problem.engine_choices}
    r = cs.eigsh(H, 6, which="BE", block_size=2, num_vectors=14, generator=g,
                 checkpoint=checkpoint, checkpoint_every=3)
    return {"eigenvalues": r.eigenvalues, "eigenvectors": r.eigenvectors,
            "residuals": r.residual_norms, "engines": problem.engine_choices}


if __name__ == "__main__":
    kind, ckpt, out = sys.argv[1:4]
    delay = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    torch.save(run(kind, ckpt, delay), out)


def run_more(kind, checkpoint, engine_choices=None):
    """Sketch and class-structure runs (in-process interruption is simulated by the test);
    ``engine_choices`` replays another run's kernels (they come back under ``"engines"``).
    """
    torch.set_num_threads(1)
    tp = tiny_mlp("classification", batch_sizes=(3, 3, 3, 2, 2))
    problem = cs.Problem(tp.model, tp.loss_fn, tp.batches)
    problem.engine_choices.update(engine_choices or {})
    if kind.startswith("sketch"):  # sketch, sketch-host, sketch-disk: where the matrices live
        H = cs.HessianOperator(problem)
        storage = kind.partition("-")[2] or "device"
        r = cs.sketch_eigh(H, 5, num_power_iters=2, block_size=4, generator=torch.Generator()
                           .manual_seed(3), checkpoint=checkpoint, checkpoint_every=2,
                           storage=storage)
        return {"eigenvalues": r.eigenvalues, "eigenvectors": r.eigenvectors,
                "engines": problem.engine_choices}
    from curvscope.analysis import class_structure

    res = class_structure(problem, checkpoint=checkpoint, checkpoint_every=1)
    return {"gram": res.gram}
