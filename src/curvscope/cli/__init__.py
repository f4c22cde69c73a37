"""The ``curvscope`` command line: a thin shell over the public API (no numerics here).

Exit codes: 0 success; 1 an analysis failed; 2 bad usage or bad input.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curvscope", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="top Hessian eigenvalues of the embedded Gaussian-mixture "
                                       "classifier (no downloads)")
    demo.add_argument("--classes", type=int, default=10, help="number of classes C (default 10)")
    demo.add_argument("-k", type=int, default=12, help="number of top eigenvalues (default 12)")
    demo.add_argument("--seed", type=int, default=0, help="seed of data, model and solver")
    return parser


def _demo(args: argparse.Namespace) -> int:
    import torch

    import curvscope as cs
    from curvscope.solvers import eigsh
    from curvscope.zoo import gaussian_mixture

    t0 = time.perf_counter()
    zoo = gaussian_mixture(args.classes, seed=args.seed)
    print(f"{zoo.name}: trained to loss {zoo.train_loss:.3g}, accuracy {zoo.train_accuracy:.0%} "
          f"({time.perf_counter() - t0:.1f} s)")
    problem = cs.Problem(zoo.model, zoo.loss_fn, zoo.batches)
    H = cs.HessianOperator(problem)
    print(f"Hessian operator: P = {problem.num_params:,} parameters, N = {problem.num_data:,} "
          f"examples, {problem.dtype}")
    result = eigsh(H, args.k, which="LA", generator=torch.Generator().manual_seed(args.seed))
    print(f"top-{args.k} eigenvalues (thick-restart block Lanczos, {result.cost.num_matvecs} "
          f"Hessian-vector products in {result.cost.num_data_passes} data passes, "
          f"{result.cost.wall_time:.1f} s):")
    for i, (lam, res) in enumerate(zip(result.eigenvalues.tolist(),
                                       result.residual_norms.tolist()), 1):
        print(f"  {i:3d}  {lam: .6e}   residual |Hv - lv| = {res:.1e}")
    return EXIT_OK if result.all_converged else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    return EXIT_USAGE  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
