"""`fedjax-lab run` trains an algorithm; `fedjax-lab list` shows what can be chosen.

With no options, `fedjax-lab run` trains FedAvg on the embedded digits data set and prints the
final test accuracy. `fedjax-lab run --resume DIR` continues an interrupted run from its newest
checkpoint; options given with it must agree with the saved configuration. Every option is
validated before anything is compiled or written. `fedjax-lab plot RUN_DIR [RUN_DIR ...]` draws
the saved runs' loss and accuracy curves and per-client accuracy as PNG files.
"""

import argparse
import dataclasses
import sys

from fedjax_lab.checkpoint import CheckpointError
from fedjax_lab.config import (ALGORITHMS, DATASETS, ConfigError, RunConfig, load_saved_config,
                               run)
from fedjax_lab.experiment import ConfigMismatchError, DivergenceError
from fedjax_lab.models import MODELS

_DEFAULTS = RunConfig()
_HELP = {
    "batch_size": "examples per local step, or 'full' for the full batch",
    "output": "folder for config, metrics, evaluations, summary and checkpoints",
    "checkpoint_every": "checkpoint every this many rounds (and at the end); needs --output",
    "allow_divergence": "keep training past a non-finite loss or parameter",
    "stragglers": "fraction of each cohort that runs 1..E-1 epochs (FedProx's protocol)",
    "mu": "FedProx's proximal coefficient",
}


def _parse_value(text: str, default):
    """Converts a command-line value like the default; a bad value is kept for validation."""
    if text == "full":
        return None
    for kind in (int, float):
        if isinstance(default, kind) or default is None:
            try:
                return kind(text)
            except ValueError:
                continue
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedjax-lab", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list algorithms, data sets and models")
    plot_parser = commands.add_parser(
        "plot", help="draw saved runs' curves and per-client accuracy as PNG files",
        description="Training loss per round and test accuracy per evaluation of one or several "
                    "runs on one figure, and the per-client test accuracy of their last "
                    "evaluation on another.")
    plot_parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                             help="a folder written by `fedjax-lab run --output`")
    plot_parser.add_argument("--output", metavar="FILE_OR_DIR",
                             help="a folder for curves.png and client_accuracy.png, or a .png "
                                  "file for the curves (the clients figure goes beside it as "
                                  "NAME_clients.png); default: the run's folder for one run, "
                                  "the current folder for several")
    run_parser = commands.add_parser("run", help="train an algorithm",
                                     argument_default=argparse.SUPPRESS)
    run_parser.add_argument("--resume", metavar="DIR",
                            help="continue the run saved in DIR from its newest checkpoint")
    for field in dataclasses.fields(RunConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(_DEFAULTS, field.name)
        help_text = f"{_HELP.get(field.name, '')} (default: {default})".strip()
        if isinstance(default, bool):
            run_parser.add_argument(flag, action="store_true", help=help_text)
        elif isinstance(default, str):
            run_parser.add_argument(flag, help=help_text)
        else:
            run_parser.add_argument(flag, help=help_text,
                                    type=lambda text, d=default: _parse_value(text, d))
    return parser


def _list() -> None:
    models = {name: factory.__doc__ or "" for name, factory in MODELS.items()}
    for title, entries in (("algorithms", ALGORITHMS), ("datasets", DATASETS),
                           ("models", models)):
        print(f"{title}:")
        for name, description in entries.items():
            print(f"  {name:14s} {description.strip().splitlines()[0] if description else ''}")


def _plot(run_dirs: list[str], output: str | None) -> int:
    from fedjax_lab.plotting import RunFolderError, plot_runs

    try:
        paths = plot_runs(run_dirs, output)
    except (RunFolderError, ImportError, OSError) as error:
        print(f"fedjax-lab: error: {error}", file=sys.stderr)
        return 2
    print("\n".join(paths))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    if command == "list":
        _list()
        return 0
    if command == "plot":
        return _plot(args["run_dirs"], args["output"])
    resume_dir = args.pop("resume", None)
    try:
        if resume_dir is None:
            config = dataclasses.replace(_DEFAULTS, **args)
        else:
            config = dataclasses.replace(load_saved_config(resume_dir), output=resume_dir)
            config = dataclasses.replace(config, **args)
        result = run(config, resume=resume_dir is not None)
    except ConfigError as error:
        print(f"fedjax-lab: error: {error.as_flag()}", file=sys.stderr)
        return 2
    except (ValueError, OSError, CheckpointError, ConfigMismatchError) as error:
        print(f"fedjax-lab: error: {error}", file=sys.stderr)
        return 2
    except DivergenceError as error:
        print(f"fedjax-lab: error: {error}", file=sys.stderr)
        return 3
    final = result.summary["final"]["test"]
    print(f"{config.algorithm} on {config.dataset}: test accuracy {final['accuracy']:.4f} "
          f"(per client mean {final['client_accuracy_mean']:.4f}, min "
          f"{final['client_accuracy_min']:.4f}) after {config.rounds} rounds in "
          f"{result.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
