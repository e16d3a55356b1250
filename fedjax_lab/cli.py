"""`fedjax-lab run` trains an algorithm; `fedjax-lab list` shows what can be chosen.

With no options, `fedjax-lab run` trains FedAvg on the embedded digits data set and prints the
final test accuracy. Every option is validated before anything is compiled or written.
"""

import argparse
import dataclasses
import sys

from fedjax_lab.config import ALGORITHMS, DATASETS, ConfigError, RunConfig, run
from fedjax_lab.models import MODELS

_DEFAULTS = RunConfig()


def _optional_batch(text: str) -> int | None | str:
    return None if text == "full" else _number(text, int)


def _number(text: str, kind):
    try:
        return kind(text)
    except ValueError:
        return text  # validation reports the bad value with the option's name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedjax-lab", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list algorithms, data sets and models")
    run_parser = commands.add_parser("run", help="train an algorithm",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for field in dataclasses.fields(RunConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(_DEFAULTS, field.name)
        if field.name == "batch_size":
            run_parser.add_argument(flag, type=_optional_batch, default=default,
                                    help="examples per local step, or 'full' for the full batch")
        elif field.name in ("output",):
            run_parser.add_argument(flag, default=default, help="folder for metrics and summary")
        elif isinstance(default, bool) or field.type in ("str",) or isinstance(default, str):
            run_parser.add_argument(flag, default=default)
        elif isinstance(default, float):
            run_parser.add_argument(flag, type=lambda t: _number(t, float), default=default)
        else:
            run_parser.add_argument(flag, type=lambda t: _number(t, int), default=default)
    return parser


def _list() -> None:
    for title, entries in (("algorithms", ALGORITHMS), ("datasets", DATASETS),
                           ("models", {name: factory.__doc__ or "" for name, factory in
                                       MODELS.items()})):
        print(f"{title}:")
        for name, description in entries.items():
            print(f"  {name:14s} {description.strip().splitlines()[0] if description else ''}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        _list()
        return 0
    config = RunConfig(**{field.name: getattr(args, field.name)
                          for field in dataclasses.fields(RunConfig)})
    try:
        result = run(config)
    except ConfigError as error:
        print(f"fedjax-lab: error: {error.as_flag()}", file=sys.stderr)
        return 2
    except (ValueError, FileExistsError, NotADirectoryError) as error:
        print(f"fedjax-lab: error: {error}", file=sys.stderr)
        return 2
    final = result.summary["final"]["test"]
    print(f"{config.algorithm} on {config.dataset}: test accuracy {final['accuracy']:.4f} "
          f"(per client mean {final['client_accuracy_mean']:.4f}, min "
          f"{final['client_accuracy_min']:.4f}) after {config.rounds} rounds in "
          f"{result.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
