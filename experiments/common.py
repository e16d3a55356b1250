"""What every experiment script shares: its command line and a lazy, headless matplotlib."""

import argparse


def experiment_parser(doc: str, *, rounds: int, seeds, output: str) -> argparse.ArgumentParser:
    """`--rounds`, `--seeds` and `--output` with the script's defaults; add its own options."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(seeds))
    parser.add_argument("--output", default=output)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv, counts=("rounds",)) -> argparse.Namespace:
    """Parses `argv`; each option named in `counts` must be a positive integer."""
    args = parser.parse_args(argv)
    for name in counts:
        value = getattr(args, name)
        if value < 1:
            parser.error(f"--{name.replace('_', '-')} {value} is invalid; "
                         "expected a positive integer")
    return args


def pyplot():
    """`matplotlib.pyplot` on the Agg back end (figures only go to files)."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("plotting needs matplotlib: pip install 'fedjax_lab[plot]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
