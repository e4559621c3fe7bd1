"""The `autoprune` command. Argument parsing lives here and nowhere else; each handler imports lazily."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from autoprune.errors import AutopruneError
from autoprune.specs import shipped


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line and exit status 2 like every other input error."""

    def error(self, message: str) -> NoReturn:
        # a value refused by its type reads as every other input error: "error: --flag: 'value' rule"
        flag, sep, rule = message.removeprefix("argument ").partition(": ")
        if message.startswith("argument ") and sep and rule.startswith("'"):
            print(f"error: {flag.split('/')[0]}: {rule}", file=sys.stderr)
        else:
            print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def _number(kind: type, *, low: float | None = None, above: float | None = None, high: float | None = None) -> Callable[[str], Any]:
    """An argparse type for a bounded, finite number: a bad one is refused with the flag's name before any work."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        rule = None
        if value != value or value in (float("inf"), float("-inf")):
            rule = "must be a finite number"
        elif low is not None and value < low:
            rule = f"must be at least {low:g}"
        elif above is not None and not value > above:
            rule = f"must be greater than {above:g}"
        elif high is not None and value > high:
            rule = f"must be at most {high:g}"
        if rule:
            raise argparse.ArgumentTypeError(f"{text!r} {rule}")
        return value

    return parse


POSITIVE_INT = _number(int, low=1)
NATURAL_INT = _number(int, low=0)
POSITIVE_FLOAT = _number(float, above=0)
NATURAL_FLOAT = _number(float, low=0)
PORT = _number(int, low=1, high=65535)


def _priors(text: str) -> tuple[str, ...]:
    from autoprune.search.priors import KINDS

    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"{text!r} names no prior kind of {', '.join(KINDS)}")
    return kinds


def parse_input_shape(text: str | None) -> tuple[int, ...] | None:
    """CxHxW for images, CxL for sequences (Conv1d models)."""
    if text is None:
        return None
    parts = text.lower().split("x")
    if len(parts) not in (2, 3) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise AutopruneError("--input", text, "must be CxHxW or CxL with positive integers, e.g. 3x32x32 or 1x40")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def _task_args(p: argparse.ArgumentParser, *, default_model: str = "digits_cnn") -> None:
    p.add_argument("--model", default=default_model, help="zoo name (digits_cnn, vgg7, vgg7_x0.5, vgg7_x0.25, resnet20, mobilenetv2) or package.module:factory")
    p.add_argument("--dataset", default=None, help="digits (default for digits_cnn), cifar10, cifar100, mnist, fashion_mnist, imagefolder")
    p.add_argument("--data-dir", default=None, help="where torchvision datasets live")
    p.add_argument("--epochs", type=POSITIVE_INT, default=None, help="base-model training epochs (default 30)")
    p.add_argument("--task-seed", type=NATURAL_INT, default=0, help="seed of the data split and base-model training")
    p.add_argument("--weights", default=None, help="the model's trained weights (.safetensors, or a state dict torch loads with weights_only=True): nothing is trained")
    p.add_argument("--task", dest="task_ref", default=None, help="package.module:function returning an autoprune.Task (your model, data, metric, loss)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--val-samples", type=POSITIVE_INT, default=None, help="score on a fixed subset of N validation samples (export scores the whole split)")
    p.add_argument("--bf16", action="store_true", help="fine-tune the float parts under bf16 autocast")


def _task(args: argparse.Namespace):  # noqa: ANN202 - returns autoprune.task.Task, imported lazily
    """The task the flags name (``--task``, ``--model --weights``, or a built-in one); the device is checked first."""
    from autoprune.task import cli_task

    return cli_task(
        model=args.model, weights=args.weights, task=args.task_ref, dataset=args.dataset, data_dir=args.data_dir, seed=args.task_seed,
        epochs=args.epochs, device=args.device, val_samples=args.val_samples, bf16=args.bf16,
    )


def _task_name(task: Any) -> str:
    """The zoo model or factory of a built-in task, else the user task's reference (or its model's class)."""
    if task.spec is not None:
        return task.spec.model
    record = task.record()
    return record.get("model") or record.get("reference") or task.key()


def console() -> Any:
    """A rich console that does not squeeze tables to 80 columns when the output is a file or pipe."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)


def _print_json(payload: Any) -> None:
    print(json.dumps(payload, indent=2))


def cmd_cost(args: argparse.Namespace) -> int:

    from autoprune.compress import static_compress
    from autoprune.cost import format_cost_table, measure_cost
    from autoprune.models import build_model, default_input_shape
    from autoprune.policy import Policy

    if args.task_ref is not None:
        from autoprune.task import task_from_reference

        if args.weights is not None:
            raise AutopruneError("--weights", args.weights, "cannot go with --task (the task brings its own weights)")
        task = task_from_reference(args.task_ref)
        known, model_name = tuple(task.input_shape), args.task_ref
    else:
        known, model_name = default_input_shape(args.model), args.model
    shape = parse_input_shape(args.input) or known
    if shape is None:
        raise AutopruneError("--input", None, f"is required for model {model_name!r} (give CxHxW or CxL)")
    if known is not None and len(shape) != len(known):
        raise AutopruneError("--input", args.input, f"has {len(shape)} sizes, but {model_name} reads {'x'.join(map(str, known))}")
    policy = Policy.load(args.policy) if args.policy else None
    if args.task_ref is not None:
        model, trained = task.build(), True
    elif args.weights is not None:
        from autoprune.weights import load_weights

        model = load_weights(build_model(args.model, in_channels=shape[0]), args.weights)
        trained = True
    else:
        model = build_model(args.model, in_channels=shape[0])
        trained = _cached_weights(args, model)
    if policy is not None:
        report = static_compress(model, policy, input_shape=shape).cost(shape)
    else:
        report = measure_cost(model, input_shape=shape)
    if args.json:
        _print_json(report.to_dict())
        return 0
    source = "trained weights" if trained else "untrained weights (no cached base model: ESN uses random init)"
    console().print(format_cost_table(report, title=f"{model_name} {'x'.join(map(str, shape))} - {source}"))
    return 0


def _cached_weights(args: argparse.Namespace, model: Any) -> bool:
    """Load the cached trained base model's weights when there is one (ESN depends on weight values)."""
    from autoprune.task import task_for

    try:
        task = task_for(args.model, dataset=getattr(args, "dataset", None), seed=getattr(args, "task_seed", 0))
    except AutopruneError:
        return False
    weights = task.cache_dir() / "model.safetensors"
    if not weights.is_file():
        return False
    from safetensors.torch import load_file

    model.load_state_dict(load_file(weights))
    return True


def cmd_apply(args: argparse.Namespace) -> int:
    from autoprune.compress import compress, save_compressed
    from autoprune.cost import format_cost_table
    from autoprune.policy import Policy
    from autoprune.search.evaluate import Evaluator

    from autoprune.compress import check_policy
    from autoprune.files import check_writable

    onnx_out = args.out is not None and Path(args.out).suffix == ".onnx"
    if onnx_out:
        from autoprune.deploy.deps import require

        for package in ("onnx", "onnxruntime"):
            require(package)
    policy = Policy.load(args.policy)
    task = _task(args)
    # on a freshly built model: a policy the model cannot take is refused before its base model is trained
    check_policy(task.build(), policy, input_shape=task.input_shape)
    if args.out:
        check_writable("--out", args.out)
    evaluator = Evaluator.for_task(task, progress=not args.json)
    result = compress(evaluator.base.model, policy, task=task)
    metrics = evaluator.score(result, test=True)
    deployed = None
    if onnx_out:
        from autoprune.deploy.point import deploy_point

        out_path = Path(args.out)
        deployed = deploy_point(result, task=task, base_model=evaluator.base.model, onnx_path=out_path, packed_path=out_path.with_suffix(".apw"))
    elif args.out:
        save_compressed(result, args.out, task=task)
    if args.json:
        _print_json({"metrics": metrics, "cost": result.cost(task.input_shape).to_dict(), "out": args.out, "deploy": deployed.model_dump() if deployed else None})
        return 0
    out = console()
    out.print(format_cost_table(result.cost(task.input_shape), title=f"{args.policy} on {_task_name(task)}"))
    out.print(
        f"validation accuracy {metrics['accuracy']:.2f}% (base {evaluator.base.val_accuracy:.2f}%), "
        f"test accuracy {metrics['test_accuracy']:.2f}% (base {evaluator.base.test_accuracy:.2f}%), "
        f"BOPs {metrics['bops']:.4g} ({metrics['bops_reduction']:.1f}x smaller)"
    )
    if deployed is not None:
        out.print(
            f"saved {deployed.onnx_file} and {deployed.packed_file}: test accuracy PyTorch {deployed.torch_test_accuracy:.2f}%, "
            f"onnxruntime {deployed.onnx_test_accuracy:.2f}%, top-1 agreement {deployed.top1_agreement:.2f}%; packed weights "
            f"{deployed.packed_weight_mbit:.4f} Mb (cost model {deployed.cost_weight_mbit:.4f} Mb, ratio {deployed.packed_over_cost_weight:.3f})"
        )
    elif args.out:
        out.print(f"saved {args.out}")
    return 0


def _search_config(args: argparse.Namespace, task: Any):  # noqa: ANN202
    """The search's flags are named after SearchConfig's (and RayOptions') fields: they go across as they are."""
    from autoprune.search.runner import SearchConfig
    from autoprune.task import TaskSpec

    values = vars(args)
    return SearchConfig.from_values(
        values,
        # a user task has no spec: run_search takes the task itself
        task=task.spec or TaskSpec(),
        space_path=shipped("search_spaces", args.space_path),
        objectives_path=shipped("objectives", args.objectives_path),
        priors=() if args.no_priors else args.priors,
    )


def cmd_search(args: argparse.Namespace) -> int:
    from autoprune.files import check_writable
    from autoprune.search.runner import run_search

    if args.export:
        check_writable("--export", args.export)
    task = _task(args)
    config = _search_config(args, task)
    if args.no_priors:
        task.skip_signals(reason="--no-priors: no S/N prior is enqueued")
    outcome = run_search(config, task=task)
    from autoprune.search.report import print_front

    print_front(outcome.study, console=console())
    if args.export:
        from autoprune.export import export_study

        written = export_study(outcome.study, out=Path(args.export), select="pareto")
        print(f"exported {len(written.policies)} policies to {args.export} (report: {written.report})")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from autoprune.search.runner import run_worker

    return run_worker(study_name=args.study, storage=args.storage, tracking_uri=args.tracking_uri, progress=not args.quiet, threads=args.threads, device=args.device)


def cmd_pareto(args: argparse.Namespace) -> int:
    from autoprune.search.report import front_rows, print_front
    from autoprune.search.runner import load_study

    study = load_study(args.study, args.storage)
    if args.json:
        _print_json(front_rows(study))
    else:
        print_front(study, console=console())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from autoprune.export import check_select, export_study
    from autoprune.files import check_writable
    from autoprune.search.runner import load_study

    check_writable("--out", args.out)
    check_select(args.select)
    study = load_study(args.study, args.storage)
    written = export_study(study, out=Path(args.out), select=args.select, format=args.format, register=args.register, tracking_uri=args.tracking_uri)
    what = "policies and ONNX models" if args.format == "onnx" else "policies"
    print(f"exported {len(written.policies)} {what} to {args.out} (report: {written.report})")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from autoprune.tracking import serve_ui

    return serve_ui(port=args.port, tracking_uri=args.tracking_uri)


def cmd_signals(args: argparse.Namespace) -> int:
    from autoprune.search.evaluate import Evaluator
    from autoprune.signals import plateau_epoch, prior_rows

    task = _task(args)
    evaluator = Evaluator.for_task(task, progress=not args.json)
    signals = evaluator.base.extras.get("signals")
    if signals is None:
        if task.is_user:
            raise AutopruneError("--task", args.task_ref, "gives a task with signal_steps=0: it has no training-time S/N record to show")
        raise AutopruneError("signals", str(task.cache_dir()), "has no training-time S/N record (delete the cached model to retrain)")
    epoch = plateau_epoch(signals)
    rows = prior_rows(evaluator.base.model, signals, epoch=epoch)
    from autoprune.sensitivity import load_or_measure, rich_table

    # the per-layer loss increases behind the sensitivity priors, measured once and cached with the model
    sensitivity = load_or_measure(evaluator.base.model, task)
    if args.json:
        _print_json({"epoch": signals["epochs"][epoch], "layers": rows, "sensitivity": sensitivity.model_dump(mode="json")})
        return 0
    from rich.table import Table

    table = Table(title=f"training-time S/N at epoch {signals['epochs'][epoch]} (first to reach the final accuracy) and the priors it implies: {_task_name(task)}")
    for column in rows[0]:
        table.add_column(column, justify="left" if column == "name" else "right")
    for row in rows:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
    console().print(table)
    console().print(rich_table(sensitivity))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="autoprune", description="Search compression policies on an ideal-hardware cost model.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("cost", help="per-layer MACs, BOPs, ESN and memory of a model (optionally under a policy)")
    p.add_argument("--model", required=True)
    p.add_argument("--input", default=None, help="CxHxW or CxL, e.g. 3x32x32 or 1x40 (zoo models know theirs)")
    p.add_argument("--policy", default=None, help="policy file (JSON or YAML)")
    p.add_argument("--weights", default=None, help="the model's weights (ESN depends on them; default: the cached trained base model)")
    p.add_argument("--task", dest="task_ref", default=None, help="package.module:function returning an autoprune.Task")
    p.add_argument("--dataset", default=None, help=argparse.SUPPRESS)
    p.add_argument("--task-seed", type=NATURAL_INT, default=0, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_cost)

    p = sub.add_parser("apply", help="apply a policy file to the task's trained base model")
    p.add_argument("policy")
    _task_args(p)
    p.add_argument("--out", default=None, help="save the compressed model here: FILE.onnx (ONNX with QDQ, plus FILE.apw packed weights), else safetensors + policy")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_apply)

    from autoprune.search.priors import DEFAULT_PRIORS, KINDS
    from autoprune.search.record import SAMPLERS

    p = sub.add_parser("search", help="run (or resume) a multi-objective search")
    _task_args(p)
    p.add_argument("--space", dest="space_path", default="default", help="search-space YAML or a shipped name (default, uniform, order, pow2)")
    p.add_argument("--objectives", dest="objectives_path", default="accuracy_bops", help="objective YAML or a shipped name")
    p.add_argument("--trials", type=POSITIVE_INT, default=60, help="trial budget of the study (resuming counts earlier trials)")
    p.add_argument("--timeout", type=POSITIVE_FLOAT, default=None, help="seconds")
    p.add_argument("--study", dest="study_name", default="autoprune", help="study name; the same name resumes")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///autoprune.db)")
    p.add_argument("--sampler", default="tpe", choices=list(SAMPLERS))
    p.add_argument("--seed", type=NATURAL_INT, default=0, help="sampler seed")
    p.add_argument("--jobs", type=POSITIVE_INT, default=1, help="local worker processes sharing the study")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default ./mlruns)")
    p.add_argument("--priors", type=_priors, default=DEFAULT_PRIORS, help=f"prior kinds enqueued first, comma-separated ({', '.join(KINDS)}; default {','.join(DEFAULT_PRIORS)}: the integer program's policies over 8 cost budgets, from the base model's sensitivity to each choice)")
    p.add_argument("--no-priors", action="store_true", help="do not enqueue any prior policy")
    p.add_argument("--fidelity", type=POSITIVE_FLOAT, default=None, help="multi-fidelity: share of finetune_steps of the short fine-tune (e.g. 0.25); the budget is then --budget-steps fine-tune steps (default --trials x finetune_steps)")
    p.add_argument("--budget-steps", type=POSITIVE_INT, default=None, help="fine-tune steps a --fidelity study may spend")
    p.add_argument("--executor", default="local", choices=["local", "ray"])
    p.add_argument("--address", default=None, help="Ray cluster address (auto, ray://HOST:PORT); default: start a local one")
    p.add_argument("--workers", type=POSITIVE_INT, default=None, help="concurrent Ray trials")
    p.add_argument("--cpus-per-trial", type=POSITIVE_FLOAT, default=1.0)
    p.add_argument("--gpus-per-trial", type=NATURAL_FLOAT, default=0.0, help="GPUs of each Ray trial (above 0 the trial runs on cuda)")
    p.add_argument("--retries", type=NATURAL_INT, default=0, help="Ray retries of a trial whose worker died")
    p.add_argument("--confirm", type=NATURAL_INT, default=0, help="re-run each front candidate with this many fine-tuning seeds; the front is recomputed from the means")
    p.add_argument("--export", default=None, help="export the front's policies to this folder at the end")
    p.add_argument("--quiet", dest="progress", action="store_false")
    p.set_defaults(handler=cmd_search)

    p = sub.add_parser("worker", help="join an existing study and run trials until its budget is spent")
    p.add_argument("--study", required=True)
    p.add_argument("--storage", required=True)
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch threads (give cores / workers when several share a machine)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available); the task comes from the study")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=cmd_worker)

    p = sub.add_parser("pareto", help="print a study's Pareto front and hypervolume")
    p.add_argument("--study", required=True)
    p.add_argument("--storage", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_pareto)

    p = sub.add_parser("export", help="write selected policies, the front and a replay report")
    p.add_argument("--study", required=True)
    p.add_argument("--storage", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--select", default="pareto", help='pareto, knee, "bops<=X", "accuracy>=Y" (any metric)')
    from autoprune.export import FORMATS

    p.add_argument("--format", default="policy", choices=list(FORMATS), help="onnx: also each point's model.onnx (QDQ) and packed weights, measured in the report and logged in MLflow")
    p.add_argument("--register", default=None, metavar="NAME", help="register the exported ONNX models under NAME in the MLflow Model Registry (needs --format onnx)")
    p.add_argument("--tracking-uri", default=None, help="the search's MLflow tracking URI (default ./mlruns)")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("ui", help="serve the MLflow UI on 127.0.0.1 over the tracking store")
    p.add_argument("--port", type=PORT, default=5000)
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(handler=cmd_ui)

    p = sub.add_parser("signals", help="training-time S/N per layer and the bit-width priors it implies")
    _task_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_signals)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # A shell that starts a command in the background hands it SIGINT ignored; Ctrl-C (or a supervisor's
    # SIGINT) must still stop a search or the UI cleanly, so KeyboardInterrupt is restored explicitly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # a bad argument (status 2, already printed) or --help (0)
        return int(exc.code or 0)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        if getattr(args, "device", None) is not None:
            from autoprune.device import resolve_device

            # before any file is read or written: a missing GPU is an input error, not a fallback
            resolve_device(args.device, field="--device")
        return handler(args)
    except AutopruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        print("interrupted: the study keeps every finished trial; run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
