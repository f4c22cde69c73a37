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
    import numpy as np
    import torch

    import curvscope as cs
    from curvscope.zoo import gaussian_mixture

    t0 = time.perf_counter()
    zoo = gaussian_mixture(args.classes, seed=args.seed)
    print(f"{zoo.name}: trained to loss {zoo.train_loss:.3g}, accuracy {zoo.train_accuracy:.0%} "
          f"({time.perf_counter() - t0:.1f} s)")
    problem = cs.Problem(zoo.model, zoo.loss_fn, zoo.batches)
    H = cs.HessianOperator(problem)
    print(f"Hessian operator: P = {problem.num_params:,} parameters, N = {problem.num_data:,} "
          f"examples, {problem.dtype}")
    try:
        import scipy.sparse.linalg as sla
    except ImportError:
        print("curvscope demo: needs scipy: pip install 'curvscope[scipy]'", file=sys.stderr)
        return EXIT_USAGE
    t1 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    vals, vecs = sla.eigsh(H.to_scipy(), k=args.k, which="LA", tol=1e-10,
                           v0=rng.standard_normal(problem.num_params))
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], vecs[:, order]
    V = torch.as_tensor(vecs.copy(), dtype=H.dtype)
    residuals = (H @ V - V * torch.as_tensor(vals.copy(), dtype=H.dtype)).norm(dim=0)
    print(f"top-{args.k} eigenvalues ({H.num_matvecs} Hessian-vector products, "
          f"{time.perf_counter() - t1:.1f} s):")
    for i, (lam, res) in enumerate(zip(vals, residuals.tolist()), 1):
        print(f"  {i:3d}  {lam: .6e}   residual |Hv - lv| = {res:.1e}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    return EXIT_USAGE  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
