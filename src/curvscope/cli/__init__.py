"""The ``curvscope`` command line: a thin shell over the public API (no numerics here).

Commands:
    demo      train the embedded Gaussian-mixture classifier, analyse it, write the bundle
    run       analyse your model: a Python file defining model(), loss() and data() factories
    report    redraw the plots and the HTML page of a saved bundle (no model needed)
    compare   put two bundles side by side

Exit codes: 0 success; 1 the analysis failed or did not converge (with --strict); 2 bad usage or
bad input (missing file, a factory that raises, a wrong loss); 130 interrupted. Whatever was
computed before a failure stays in ``OUT/partial.json``, and the finished stages in ``OUT/stages``:
the same command again continues from them (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import runpy
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from curvscope._atomic import write_atomic
from curvscope._progress import ProgressUpdate, StagePlan, plan_lines, progress_line

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

RUN_CONTRACT = """\
A run file is a Python file that defines these functions (factories, called once each):
    model() -> torch.nn.Module          the trained model to analyse
    loss() -> callable                  e.g. torch.nn.CrossEntropyLoss()
    data() -> DataLoader | list         batches (inputs, target) or dicts with "labels"
and optionally:
    test_data() -> DataLoader | list    held-out data: the report adds the test Hessian
    problem_options() -> dict           extra curvscope.Problem options (batch_fn, mode, ...)
    checkpoints() -> list[(step, state_dict)]   spectra along training
See examples/small_cnn.py."""


class UsageError(Exception):
    """Bad input from the user: reported in one line with exit code 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="curvscope", description="Curvature of deep-network losses: spectra, outliers, "
        "Papyan's decomposition, reports.",
        epilog="Exit codes: 0 ok, 1 analysis failed (or not converged with --strict), 2 bad "
        "input, 130 interrupted.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", type=Path, default=None, help="output folder for the bundle")
        p.add_argument("--seed", type=int, default=0, help="seed of every random choice")
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
        p.add_argument("--dtype", choices=["float32", "float64"], default=None,
                       help="convert the model and data to this dtype")
        p.add_argument("--budget", choices=["small", "default", "large"], default="default",
                       help="SLQ probes x Lanczos steps: small 4x40, default 10x80, large 20x150")
        p.add_argument("-k", type=int, default=None, help="top eigenpairs (default 2C + 10)")
        p.add_argument("--method", choices=["auto", "exact", "iterative"], default="auto",
                       help="exact: dense H and G from products and eigh (every eigenvalue); "
                       "iterative: Lanczos, eigsh and SLQ; auto (default): exact when it takes "
                       "fewer products (small models)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--fresh", action="store_true",
                       help="discard the stages an interrupted run left in --out (by default "
                       "the same command continues from them)")
        p.add_argument("--threads", type=int, default=None,
                       help="CPU threads for torch (default: torch's choice; 1 is fastest for "
                       "small models on a busy machine)")
        p.add_argument("--strict", action="store_true",
                       help="exit 1 when an eigensolver did not converge")

    demo = sub.add_parser("demo", help="analyse the embedded Gaussian-mixture classifier")
    demo.add_argument("--classes", type=int, default=10, help="number of classes C (default 10)")
    common(demo)
    run = sub.add_parser("run", help="analyse your model from a Python file of factories",
                         description=RUN_CONTRACT,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("file", type=Path, help="Python file defining model(), loss(), data()")
    common(run)
    rep = sub.add_parser("report", help="redraw plots and HTML of a saved bundle")
    rep.add_argument("bundle", type=Path)
    rep.add_argument("--out", type=Path, default=None, help="default: the bundle folder")
    cmp_ = sub.add_parser("compare", help="two bundles side by side")
    cmp_.add_argument("a", type=Path)
    cmp_.add_argument("b", type=Path)
    cmp_.add_argument("--out", type=Path, default=None, help="write compare.json / .html here")
    return parser


# ----------------------------------------------------------------------------- helpers
def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(payload, indent=1, default=str).encode("utf-8"))


class _Stages:
    """A progress bar over the analysis stages that also saves ``partial.json`` after each."""

    NAMES = ("plan", "top", "bottom", "density", "papyan", "classes", "sweeps", "test", "bundle")

    def __init__(self, out: Path, show: bool) -> None:
        self.out, self.bar = out, None
        self.path = out / "partial.json"
        self.written = False  # whether this run wrote partial.json (an older one may be there)
        self.partial: dict[str, Any] = {}
        self._shown = 0.0  # when the progress line was last redrawn
        self._stage: str | None = None  # and for which stage
        if show:
            from tqdm.auto import tqdm

            # the time left is the analysis's (the plan at the run's speed), not tqdm's
            self.bar = tqdm(total=len(self.NAMES), desc="curvscope", unit="stage",
                            bar_format="{desc} {n_fmt}/{total_fmt} stages |{bar:12}| "
                                       "{elapsed}{postfix}")

    def __call__(self, name: str, done: dict[str, Any]) -> None:
        if name == "plan":  # before the products start: what each stage will take
            plan = done["plan"]
            for line in plan_lines(plan["method"],
                                   [StagePlan.from_dict(s) for s in plan["stages"]]):
                print(line) if self.bar is None else self.bar.write(line)
        self.partial.update(done)
        _write_json_atomic(self.path, {"stages_done": list(self.partial), **self.partial})
        self.written = True
        if self.bar is not None:
            self.bar.set_postfix_str(name)
            self.bar.update(1)

    def progress(self, update: ProgressUpdate) -> None:
        """After every product: the stage, its columns, the run's and the time left."""
        now = time.perf_counter()
        if self.bar is None or (now - self._shown < 0.25 and update.stage == self._stage):
            return  # redrawn at most 4 times a second, and whenever the stage changes
        self._shown, self._stage = now, update.stage
        self.bar.set_postfix_str(progress_line(update))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def finish(self) -> None:
        """The run ended: its ``partial.json`` goes (the bundle holds everything)."""
        self.path.unlink(missing_ok=True)
        self.written = False


def _dtype(name: str | None) -> Any:
    import torch

    return None if name is None else getattr(torch, name)


def _prepare_model(model: Any, args: argparse.Namespace) -> Any:
    import torch

    from curvscope.curvature._input_checks import check_not_meta

    try:
        check_not_meta(model)
    except ValueError as err:
        raise UsageError(str(err)) from err
    dtype = _dtype(args.dtype)
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise UsageError(f"--device {args.device!r} is not a device: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} asked for CUDA, but torch sees no GPU; use "
                         "--device cpu.")
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


def _analyse(model: Any, loss_fn: Any, data: Any, args: argparse.Namespace, out: Path,
             *, test_data: Any = None, checkpoints: Any = None, options: dict | None = None,
             name: str = "model", identity: dict | None = None) -> int:
    """The shared tail of ``demo`` and ``run``: one :func:`~curvscope.study.run_study` call,
    then the summary printed. Everything written comes from that call.
    """
    from curvscope.study import StudyInputError, StudyMismatchError, run_study

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    model = _prepare_model(model, args)
    opts = {"move_batches": True, **(options or {})}
    stages = _Stages(out, show=not args.no_progress)
    args.stages = stages  # main() names partial.json in a failure message only once it exists
    try:
        study = run_study(
            model, loss_fn, data, out=out, test_data=test_data, checkpoints=checkpoints,
            problem_options=opts, k=args.k, budget=args.budget, seed=args.seed,
            method=args.method, fresh=args.fresh, on_stage=stages,
            on_progress=stages.progress, identity=identity,
            provenance_extra={"name": name,
                              "command": " ".join(sys.argv[1:]) or args.command})
    except StudyMismatchError as err:
        raise UsageError(str(err).replace("fresh=True (curvscope: --fresh)", "--fresh")) from err
    except StudyInputError as err:
        raise UsageError(str(err)) from err
    finally:
        stages.close()
    stages.finish()  # a finished run leaves no partial.json
    analysis, problem, paths = study.analysis, study.problem, study.paths
    if study.resumed:
        print(f"\nresumed: {len(study.resumed)} stage(s) of an interrupted run read back from "
              f"{out}/stages ({', '.join(study.resumed)})")
    print(f"\n{name}: P = {problem.num_params:,} parameters, N = {problem.num_data:,} "
          f"{problem.data_unit}, {problem.dtype}, {time.perf_counter() - t0:.1f} s")
    for sentence in study.summary():
        print(f"  - {sentence}")
    print(f"bundle: {out}/ (open {paths.get('html', out / 'report.html')})")
    converged = analysis.top.all_converged and analysis.bottom.all_converged
    return EXIT_FAILED if (args.strict and not converged) else EXIT_OK


# ----------------------------------------------------------------------------- commands
def _demo(args: argparse.Namespace) -> int:
    from curvscope.zoo import gaussian_mixture

    if args.classes < 2:
        raise UsageError(f"--classes must be at least 2, got {args.classes}.")
    t0 = time.perf_counter()
    zoo = gaussian_mixture(args.classes, seed=args.seed)
    print(f"{zoo.name}: trained to loss {zoo.train_loss:.3g}, accuracy {zoo.train_accuracy:.0%} "
          f"({time.perf_counter() - t0:.1f} s)")
    out = args.out or Path("curvscope-out") / "demo"
    return _analyse(zoo.model, zoo.loss_fn, zoo.batches, args, out,
                    test_data=getattr(zoo, "test_batches", None),
                    checkpoints=getattr(zoo, "checkpoints", None), name=zoo.name)


def _load_factories(path: Path) -> dict[str, Any]:
    """Execute the run file as ``python FILE`` would, but not as ``__main__``.

    ``__file__`` is the file's absolute path and the file's folder is first on ``sys.path``, so a
    module beside it imports (:func:`_run` keeps the folder there while the factories run).
    """
    if not path.is_file():
        raise UsageError(f"run file {str(path)!r} not found; expected a Python file defining "
                         "model(), loss() and data().")
    try:
        namespace = runpy.run_path(str(path.resolve()), run_name=f"curvscope_run_{path.stem}")
    except Exception as err:  # noqa: BLE001 - any error in user code is bad input
        raise UsageError(f"{path} failed to load: {type(err).__name__}: {err}") from err
    missing = [f for f in ("model", "loss", "data") if not callable(namespace.get(f))]
    if missing:
        raise UsageError(f"{path} must define {', '.join(f'{m}()' for m in missing)}; "
                         "see `curvscope run --help`.")
    return namespace


def _call(namespace: dict[str, Any], name: str, path: Path) -> Any:
    if not callable(namespace.get(name)):
        return None
    try:
        return namespace[name]()
    except Exception as err:  # noqa: BLE001 - any error in user code is bad input
        raise UsageError(f"{path}: {name}() raised {type(err).__name__}: {err}") from err


def _run(args: argparse.Namespace) -> int:
    folder = str(args.file.resolve().parent)
    sys.path.insert(0, folder)  # as `python FILE` does: modules beside the run file import
    try:
        return _run_file(args)
    finally:
        if folder in sys.path:
            sys.path.remove(folder)


def _run_file(args: argparse.Namespace) -> int:
    import torch

    ns = _load_factories(args.file)
    model = _call(ns, "model", args.file)
    loss_fn = _call(ns, "loss", args.file)
    data = _call(ns, "data", args.file)
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{args.file}: model() must return a torch.nn.Module, got "
                         f"{type(model).__name__}.")
    if not callable(loss_fn):
        raise UsageError(f"{args.file}: loss() must return a callable loss (e.g. "
                         f"torch.nn.CrossEntropyLoss()), got {type(loss_fn).__name__}.")
    out = args.out or Path("curvscope-out") / args.file.stem
    return _analyse(model, loss_fn, data, args, out, test_data=_call(ns, "test_data", args.file),
                    checkpoints=_call(ns, "checkpoints", args.file),
                    options=_call(ns, "problem_options", args.file), name=args.file.stem,
                    identity={"run_file": hashlib.sha256(args.file.read_bytes()).hexdigest()})


def _report(args: argparse.Namespace) -> int:
    from curvscope.report import load_bundle, save_bundle

    try:
        bundle = load_bundle(args.bundle)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from err
    out = args.out or args.bundle
    paths = save_bundle(bundle.analysis, out, provenance=bundle.provenance, extras=bundle.extras)
    print(f"redrew {len(paths)} files in {out}/")
    return EXIT_OK


def _compare(args: argparse.Namespace) -> int:
    from curvscope.report import load_bundle
    from curvscope.report.compare import compare_bundles, render_compare_html

    try:
        a, b = load_bundle(args.a), load_bundle(args.b)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from err
    comparison = compare_bundles(a, b)
    for sentence in comparison["differences"]:
        print(f"note: {sentence}")
    rows = comparison["rows"]
    width = max(len(k) for k in rows)
    print(f"{'':{width}}  {str(args.a):>28}  {str(args.b):>28}")
    for key, (va, vb) in rows.items():
        print(f"{key:{width}}  {va:>28}  {vb:>28}")
    if args.out is not None:
        _write_json_atomic(args.out / "compare.json", comparison)
        (args.out / "compare.html").write_text(render_compare_html(comparison))
    return EXIT_OK


@contextlib.contextmanager
def _one_line_warnings(command: str) -> Iterator[None]:
    """Show each distinct warning once, as ``curvscope CMD: note: Category: message`` (no source
    line from deep inside the library).
    """
    seen: set[str] = set()

    def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        text = f"{category.__name__}: {message}"
        if text not in seen:
            seen.add(text)
            print(f"curvscope {command}: note: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.filterwarnings("ignore", message=".*performance drop because we have not yet "
                                "implemented the batching rule.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.showwarning = show
        yield


COMMANDS = {"demo": _demo, "run": _run, "report": _report, "compare": _compare}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    args = _parser().parse_args(argv)
    if getattr(args, "k", None) is not None and args.k < 1:
        print(f"curvscope {args.command}: error: -k must be at least 1 (the number of top "
              f"eigenpairs), got {args.k}; omit it for the default (2C + 10 for C classes).", file=sys.stderr)
        return EXIT_USAGE
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            print(f"curvscope {args.command}: error: --threads must be at least 1, got "
                  f"{args.threads}.", file=sys.stderr)
            return EXIT_USAGE
        import torch

        torch.set_num_threads(args.threads)
    try:
        with _one_line_warnings(args.command):
            return COMMANDS[args.command](args)
    except UsageError as err:
        print(f"curvscope {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"curvscope {args.command}: interrupted{_partial_note(args, 'are in')}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - one line, not a traceback from deep inside torch
        first = f": {str(err).strip().splitlines()[0]}" if str(err).strip() else ""
        print(f"curvscope {args.command}: failed: {type(err).__name__}{first}"
              f"{_partial_note(args, 'are kept in')}", file=sys.stderr)
        return EXIT_FAILED


def _partial_note(args: argparse.Namespace, verb: str) -> str:
    """``"; partial results are in OUT/partial.json"`` when this run wrote it, else ``""``."""
    stages = getattr(args, "stages", None)
    if stages is None or not stages.written or not stages.path.is_file():
        return ""
    return (f"; partial results {verb} {stages.path}, the finished stages in "
            f"{stages.out / 'stages'}: the same command continues from them")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
