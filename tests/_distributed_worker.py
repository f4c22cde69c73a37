"""Run under torchrun (gloo, CPU): products, eigenvalues and densities of a tiny problem.

Usage: torchrun --nproc_per_node=2 tests/_distributed_worker.py OUT_DIR [fail|hang]
Each rank saves its results to OUT_DIR/rank{r}.pt; `fail` makes rank 1 raise before the first
product, `hang` makes it sleep, to check that the other rank errors out within the timeout.
"""

import sys
import time

import torch

import curvscope as cs
from curvscope.analysis import class_structure
from curvscope.distributed import init_from_env
from curvscope.testing import tiny_mlp


def compute(problem):
    H = cs.HessianOperator(problem)
    G = cs.GGNOperator(problem)
    V = torch.randn(problem.num_params, 4, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    top = cs.eigsh(H, 5, generator=torch.Generator().manual_seed(1))
    density = cs.slq(H, 3, 20, generator=torch.Generator().manual_seed(2))
    sharded = cs.lanczos(H, 25, num_probes=2, basis="sharded", reorth="full",
                         generator=torch.Generator().manual_seed(4))
    sketch = cs.sketch_eigh(H, 4, num_power_iters=3, block_size=3, storage="sharded",
                            generator=torch.Generator().manual_seed(5))
    loss, grad = problem.loss_and_gradient()
    return {
        "HV": H @ V, "GV": G @ V, "covV": cs.GradientCovarianceOperator(problem) @ V,
        "top": top.eigenvalues, "nodes": density.nodes, "weights": density.weights,
        "loss": loss, "grad": grad, "num_data": problem.num_data,
        "sharded_alpha": sharded.alpha, "sharded_beta": sharded.beta,
        "gram": class_structure(problem).gram,
        "sketch_values": sketch.eigenvalues, "sketch_residuals": sketch.residual_norms,
        "sketch_error": torch.tensor(sketch.error_estimate),
        "sketch_vectors_kept": sketch.eigenvectors is not None,
    }


def main():
    out, mode = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "ok")
    rank, size = init_from_env("gloo", timeout_s=20)
    torch.set_num_threads(1)
    tp = tiny_mlp("classification", batch_sizes=(5, 5, 3, 4, 2))
    problem = cs.Problem(tp.model, tp.loss_fn, tp.batches)
    if mode == "fail" and rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    if mode == "hang" and rank == 1:
        time.sleep(120)
    torch.save(compute(problem), f"{out}/rank{rank}.pt")
    torch.distributed.barrier()  # both ranks done before rank 0 tears down the store
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
