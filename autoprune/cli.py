"""The `autoprune` command. Argument parsing lives here and nowhere else; each handler imports lazily."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any, Callable, NoReturn, Sequence

from autoprune.errors import AutopruneError, FaultError, disk_full


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line and exit status 2 like every other input error, and the flag of
    every destination is kept: the API's errors name a field (``trials``), shown here as its flag (``--trials``)."""

    flags: dict[str, str]

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        longest = max(action.option_strings, key=len, default=None)
        if longest is not None:
            # argparse's own __init__ adds --help before any attribute of ours exists
            self.__dict__.setdefault("flags", {})[action.dest] = longest
        return action

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
    p.add_argument("--model", default=default_model, help="zoo name (digits_cnn, mnist1d_cnn, mnist1d_gru, mnist1d_transformer, vgg7, vgg7_x0.5, vgg7_x0.25, resnet20, mobilenetv2) or package.module:factory")
    p.add_argument("--dataset", default=None, help="digits (default for digits_cnn), cifar10, cifar100, mnist, fashion_mnist, imagefolder")
    p.add_argument("--data-dir", default=None, help="where torchvision datasets live")
    p.add_argument("--epochs", type=POSITIVE_INT, default=None, help="base-model training epochs (default 30)")
    p.add_argument("--task-seed", type=NATURAL_INT, default=0, help="seed of the data split and base-model training")
    p.add_argument("--weights", default=None, help="the model's trained weights (.safetensors, or a state dict torch loads with weights_only=True): nothing is trained")
    p.add_argument("--task", dest="task_ref", default=None, help="package.module:function returning an autoprune.Task (your model, data, metric, loss)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--val-samples", type=POSITIVE_INT, default=None, help="score on a fixed subset of N validation samples (export scores the whole split)")
    p.add_argument("--bf16", action="store_true", help="fine-tune the float parts under bf16 autocast")


def _task_args_of(args: argparse.Namespace):  # noqa: ANN202 - autoprune.api.TaskArgs, imported lazily
    """The task flags as the API's validated task arguments."""
    from autoprune.api import TaskArgs

    return TaskArgs(
        model=args.model, dataset=args.dataset, data_dir=args.data_dir, epochs=args.epochs, seed=args.task_seed, weights=args.weights,
        reference=args.task_ref, device=args.device, val_samples=args.val_samples, bf16=args.bf16,
    )


def _task_name(args: argparse.Namespace) -> str:
    """What the flags named: the reference of a --task, else the model."""
    return args.task_ref or args.model


def console() -> Any:
    from autoprune.search.report import wide_console

    return wide_console()


def _print_json(payload: Any) -> None:
    print(json.dumps(payload, indent=2))


def cmd_cost(args: argparse.Namespace) -> int:
    import autoprune.api as api
    from autoprune.cost import format_cost_table
    from autoprune.models import default_input_shape

    model: Any = args.model
    if args.task_ref is not None:
        if args.weights is not None:
            raise AutopruneError("--weights", args.weights, "cannot go with --task (the task brings its own weights)")
        from autoprune.task import task_from_reference

        model = task_from_reference(args.task_ref)
    given = parse_input_shape(args.input)
    report = api.cost(model, input_shape=given, policy=args.policy, weights=args.weights, dataset=args.dataset, seed=args.task_seed)
    if args.json:
        _print_json(report.to_dict())
        return 0
    shape = given or (tuple(model.input_shape) if args.task_ref is not None else default_input_shape(args.model))
    console().print(format_cost_table(report, title=f"{_task_name(args)} {'x'.join(map(str, shape or ()))} - {report.weights}"))
    return 0


def _by_reason(pinned: dict[str, str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for layer, why in pinned.items():
        grouped.setdefault(why, []).append(layer)
    return grouped


def cmd_apply(args: argparse.Namespace) -> int:
    import autoprune.api as api
    from autoprune.cost import format_cost_table

    from autoprune.policy import Policy

    policy = Policy.load(args.policy)
    task = _task_args_of(args).build()
    result = api.apply(None, policy, task=task, score=True, out=args.out)
    metrics, deployed = result.metrics, result.deployed
    cost = result.cost(task.input_shape)
    if args.json:
        _print_json({
            "metrics": metrics, "cost": cost.to_dict(), "out": args.out, "deploy": deployed.model_dump() if deployed else None,
            "pinned": result.pinned, "float_parameters": result.float_parameters,
        })
        return 0
    name = task.metric_name
    out = console()
    out.print(format_cost_table(cost, title=f"{args.policy} on {_task_name(args)}"))
    for why, layers in _by_reason(result.pinned).items():
        shown = ", ".join(layers[:4]) + (f" and {len(layers) - 4} more" if len(layers) > 4 else "")
        out.print(f"width kept (pinned) for {shown}: {why}")
    out.print(
        f"validation {name} {metrics[name]:.2f} (base {metrics['base_' + name]:.2f}), "
        f"test {name} {metrics['test_' + name]:.2f} (base {metrics['base_test_' + name]:.2f}), "
        f"BOPs {metrics['bops']:.4g} ({metrics['bops_reduction']:.1f}x smaller)"
    )
    if deployed is not None:
        out.print(
            f"saved {deployed.onnx_file} and {deployed.packed_file}: test {name} PyTorch {deployed.torch_test_accuracy:.2f}, "
            f"onnxruntime {deployed.onnx_test_accuracy:.2f}, top-1 agreement {deployed.top1_agreement:.2f}%; packed weights "
            f"{deployed.packed_weight_mbit:.4f} Mb (cost model {deployed.cost_weight_mbit:.4f} Mb, ratio {deployed.packed_over_cost_weight:.3f}); "
            f"ms per batch of {deployed.latency_batch}: onnxruntime {deployed.onnx_ms:.3f} (CPU time {deployed.latency_measured_ms:.3f}, "
            f"latency model {deployed.latency_model_ms:.3f}), "
            f"PyTorch float base {deployed.torch_float_base_ms:.3f}; "
            f"{len(deployed.integer_kernel_layers)} of {len(deployed.runtime_kernels)} layers on onnxruntime's integer kernels"
        )
    elif args.out:
        out.print(f"saved {args.out}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    import autoprune.api as api

    api.search(
        _task_args_of(args), space=args.space_path, objectives=args.objectives_path, trials=args.trials, study=args.study_name,
        storage=args.storage, tracking_uri=args.tracking_uri, sampler=args.sampler, executor=args.executor,
        priors=() if args.no_priors else args.priors, seed=args.seed, jobs=args.jobs, timeout=args.timeout, confirm=args.confirm,
        fidelity=args.fidelity, budget_steps=args.budget_steps, export=args.export, progress=args.progress, quiet=False,
        ladder=not args.no_ladder, finalize=args.finalize, final_steps=args.final_steps, final_seeds=args.final_seeds,
        ray={"address": args.address, "workers": args.workers, "cpus_per_trial": args.cpus_per_trial, "gpus_per_trial": args.gpus_per_trial, "retries": args.retries},
    )
    return 0


def cmd_finalize(args: argparse.Namespace) -> int:
    import autoprune.api as api

    api.finalize(
        args.study, storage=args.storage, steps=args.steps, seeds=args.seeds, select=args.select, out=args.out, tracking_uri=args.tracking_uri,
        jobs=args.jobs, progress=not args.quiet, quiet=False,
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import autoprune.api as api

    return api.worker(study=args.study, storage=args.storage, tracking_uri=args.tracking_uri, threads=args.threads, device=args.device, progress=not args.quiet)


def cmd_pareto(args: argparse.Namespace) -> int:
    import autoprune.api as api
    from autoprune.search.report import print_front

    data = api.pareto(args.study, storage=args.storage)
    if args.json:
        _print_json(data)
    else:
        print_front(data, console=console())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import autoprune.api as api

    written = api.export(args.study, out=args.out, storage=args.storage, select=args.select, format=args.format, register=args.register, tracking_uri=args.tracking_uri)
    what = "policies and ONNX models" if args.format == "onnx" else "policies"
    print(f"exported {len(written.policies)} {what} to {args.out} (report: {written.report})")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    import autoprune.api as api

    return api.ui(port=args.port, tracking_uri=args.tracking_uri)


def cmd_signals(args: argparse.Namespace) -> int:
    import autoprune.api as api
    from autoprune.sensitivity import rich_table

    report = api.signals(_task_args_of(args), progress=not args.json)
    if args.json:
        _print_json({"epoch": report.epoch, "layers": report.layers, "sensitivity": report.sensitivity.model_dump(mode="json")})
        return 0
    from rich.table import Table

    table = Table(title=f"training-time S/N at epoch {report.epoch} (first to reach the final accuracy) and the priors it implies: {_task_name(args)}")
    for column in report.layers[0]:
        table.add_column(column, justify="left" if column == "name" else "right")
    for row in report.layers:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
    console().print(table)
    console().print(rich_table(report.sensitivity))
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
    p.set_defaults(handler=cmd_cost, flags=p.flags)

    p = sub.add_parser("apply", help="apply a policy file to the task's trained base model")
    p.add_argument("policy")
    _task_args(p)
    p.add_argument("--out", default=None, help="save the compressed model here: FILE.onnx (ONNX with QDQ, plus FILE.apw packed weights), else safetensors + policy")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_apply, flags=p.flags)

    from autoprune.search.priors import DEFAULT_PRIORS, KINDS
    from autoprune.search.record import SAMPLERS

    p = sub.add_parser("search", help="run (or resume) a multi-objective search")
    _task_args(p)
    p.add_argument("--space", dest="space_path", default="default", help="search-space YAML or a shipped name (default, uniform, order, pow2, weight_only)")
    p.add_argument("--objectives", dest="objectives_path", default="accuracy_bops", help="objective YAML or a shipped name")
    p.add_argument("--trials", type=POSITIVE_INT, default=60, help="trial budget of the study (resuming counts earlier trials)")
    p.add_argument("--timeout", type=POSITIVE_FLOAT, default=None, help="seconds")
    p.add_argument("--study", dest="study_name", default="autoprune", help="study name; the same name resumes")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///autoprune.db)")
    p.add_argument("--sampler", default="tpe", choices=list(SAMPLERS))
    p.add_argument("--seed", type=NATURAL_INT, default=0, help="sampler seed")
    p.add_argument("--jobs", type=POSITIVE_INT, default=1, help="local processes sharing the study (with --finalize, candidates finally trained at once)")
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
    p.add_argument("--no-ladder", action="store_true", help="fine-tune every trial (by default a trial is fine-tuned only when its post-training result could still reach the front)")
    p.add_argument("--finalize", action="store_true", help="after the search, train the candidates that could be on the final front further: the front and the export read the final models")
    p.add_argument("--final-steps", type=POSITIVE_INT, default=None, help="steps of final training (default 1500)")
    p.add_argument("--final-seeds", type=POSITIVE_INT, default=1, help="seeds of final training per candidate (mean and 95%% interval reported)")
    p.add_argument("--export", default=None, help="export the front's policies to this folder at the end")
    p.add_argument("--quiet", dest="progress", action="store_false")
    p.set_defaults(handler=cmd_search, flags=p.flags)

    p = sub.add_parser("finalize", help="train a study's candidates that could be on the final front further, and export them")
    p.add_argument("--study", required=True)
    p.add_argument("--storage", default=None)
    p.add_argument("--select", default="pareto", help='pareto (the candidates that could reach the final front), front (the whole search front), or "bops<=X"')
    p.add_argument("--steps", type=POSITIVE_INT, default=None, help="steps of final training (default 1500)")
    p.add_argument("--seeds", type=POSITIVE_INT, default=1, help="seeds per candidate (mean and 95%% interval reported; the best-validation seed's model is kept)")
    p.add_argument("--out", default=None, help="export the final models (weights, policies, ONNX with the deploy extra) to this folder")
    p.add_argument("--tracking-uri", default=None, help="the search's MLflow tracking URI (default ./mlruns)")
    p.add_argument("--jobs", type=POSITIVE_INT, default=1, help="candidates trained at once, each in its own process")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=cmd_finalize, flags=p.flags)

    p = sub.add_parser("worker", help="join an existing study and run trials until its budget is spent")
    p.add_argument("--study", required=True)
    p.add_argument("--storage", required=True)
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch threads (give cores / workers when several share a machine)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available); the task comes from the study")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=cmd_worker, flags=p.flags)

    p = sub.add_parser("pareto", help="print a study's Pareto front and hypervolume")
    p.add_argument("--study", required=True)
    p.add_argument("--storage", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_pareto, flags=p.flags)

    p = sub.add_parser("export", help="write selected policies, the front and a replay report")
    p.add_argument("--study", required=True)
    p.add_argument("--storage", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--select", default="pareto", help='pareto, knee, "bops<=X", "accuracy>=Y" (any metric)')
    p.add_argument("--format", default="policy", help="policy, or onnx: also each point's model.onnx (QDQ) and packed weights, measured in the report and logged in MLflow")
    p.add_argument("--register", default=None, metavar="NAME", help="register the exported ONNX models under NAME in the MLflow Model Registry (needs --format onnx)")
    p.add_argument("--tracking-uri", default=None, help="the search's MLflow tracking URI (default ./mlruns)")
    p.set_defaults(handler=cmd_export, flags=p.flags)

    p = sub.add_parser("ui", help="serve the MLflow UI on 127.0.0.1 over the tracking store")
    p.add_argument("--port", type=PORT, default=5000)
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(handler=cmd_ui, flags=p.flags)

    p = sub.add_parser("signals", help="training-time S/N per layer and the bit-width priors it implies")
    _task_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_signals, flags=p.flags)
    return parser


# API fields whose destination is named otherwise
_ALIASES = {
    "input_shape": "input", "reference": "task_ref", "task": "task_ref", "study": "study_name", "space": "space_path", "objectives": "objectives_path",
    "final_steps": "steps", "final_seeds": "seeds",
}


def flag_of(field: str, flags: dict[str, str]) -> str:
    """The flag that sets an API field (``ray.workers`` -> ``--workers``); the field itself when none does."""
    if field.startswith("-"):
        return field
    last = field.rsplit(".", 1)[-1]
    for dest in (field, last, _ALIASES.get(last)):
        if dest in flags:
            return flags[dest]
    return field


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # A shell that starts a command in the background hands it SIGINT ignored; Ctrl-C (or a supervisor's
    # SIGINT) must still stop a search or the UI cleanly, so KeyboardInterrupt is restored explicitly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
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
        exc.field = flag_of(exc.field, args.flags)
        print(f"error: {exc.line()}", file=sys.stderr)
        frame = getattr(exc, "frame", None)  # the user's own code failed (usercode.UserCodeError): where
        if frame:
            print(f"  at {frame}", file=sys.stderr)
        return 2
    except FaultError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    except Exception as exc:
        full = disk_full(exc)
        if not full:
            raise
        print(f"error: the disk is full ({full}): what was written whole is kept; free some space and run the same command again", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the study keeps every finished trial; run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
