"""`fedjax-lab`: run any registered algorithm, list what can be chosen, describe data, plot runs.

    fedjax-lab run [--config FILE] [--algorithm NAME] [--data NAME] [--model NAME]
                   [--SECTION.OPTION VALUE ...] [--rounds N] [--seed N] [--output DIR] ...
    fedjax-lab run --resume DIR
    fedjax-lab sweep --output DIR [--seeds 0-7] [--SECTION.OPTION V1,V2,...] [run's options]
                     [--metric NAME] [--points-per-program N] [--chunks-at-once N]
                     [--memory-budget BYTES]
    fedjax-lab sweep --resume DIR [--chunks-at-once N]
    fedjax-lab list [NAME]
    fedjax-lab data describe [--data NAME] [--data.OPTION VALUE ...] [--plot FILE.png] [--json]
    fedjax-lab plot RUN_DIR [RUN_DIR ...] [--output FILE_OR_DIR]

With no options, `fedjax-lab run` trains FedAvg on the embedded digits data set and prints the
final test accuracy. Options are generated from the registries' config dataclasses: SECTION is
algorithm, data, model or run, and the run options also have flat spellings (`--rounds 5` is
`--run.rounds 5`). `fedjax-lab list NAME` shows an algorithm's, data set's or model's options.
Every option is validated before anything is compiled or written; a bad one is a one-line error.

`fedjax-lab sweep` runs a grid: seeds (`--seeds 0-7` or `0,3,5`) times the comma-separated values
of number options (`--algorithm.mu 0,0.01,0.1`); options marked sweepable share one compiled
program across their values and the seeds (`fedjax_lab.sweep`). `--metric NAME` (default
accuracy) picks the best setting; `--points-per-program N` sets the runs stacked in one program
(default: as many as fit in memory; one on CPU, where stacking is slower), `--chunks-at-once N`
how many such programs run at once in threads (default: the cores on CPU, one elsewhere) and
`--memory-budget BYTES` the memory they may take together (default: half the device's, the
host's on CPU).

`run` and `sweep` keep compiled programs in JAX's persistent compilation cache, so a second run of
the same shape starts without compiling: `--compile-cache DIR` chooses the folder (default
$XDG_CACHE_HOME/fedjax_lab/jax, or the FEDJAX_LAB_COMPILE_CACHE environment variable) and
`--compile-cache off` turns it off.
"""

import json
import os
import sys

from fedjax_lab import config as run_config
from fedjax_lab import options
from fedjax_lab.checkpoint import CheckpointError
from fedjax_lab.config import SECTIONS, RunOptions
from fedjax_lab.experiment import CONFIG_FILE, ConfigMismatchError, DivergenceError
from fedjax_lab.options import OptionError

_RUN_FIELDS = {name.replace("_", "-"): name for name in options.field_names(RunOptions)}


class UsageError(ValueError):
    """A command line that cannot be read (a missing value, an unknown flag)."""


def _flag(path: str) -> str:
    section, _, rest = path.partition(".")
    if section == "run" and rest:
        return "--" + rest.replace("_", "-")
    if rest == "name":
        return f"--{section}"
    return f"--{path}" if rest else "--" + path.replace("_", "-")


def _error(message: str, code: int = 2) -> int:
    print(f"fedjax-lab: error: {message}", file=sys.stderr)
    return code


def _option_error(error: OptionError) -> int:
    return _error(f"{_flag(error.path)} {error.value!r} is invalid; {error.expected}")


def _split_flags(argv: list[str], takes_no_value: set[str]) -> list[tuple[str, str | None]]:
    """(name, value) pairs of `--name value` / `--name=value` / `--flag` tokens, in order."""
    pairs, index = [], 0
    while index < len(argv):
        token = argv[index]
        if not token.startswith("--") or token == "--":
            raise UsageError(f"unexpected argument {token!r}; options are --name value")
        name, equals, value = token[2:].partition("=")
        if not equals:
            if name in takes_no_value:
                value = None
            elif index + 1 < len(argv):
                index += 1
                value = argv[index]
            else:
                raise UsageError(f"--{name} needs a value")
        pairs.append((name, value))
        index += 1
    return pairs


def parse_overrides(pairs, base: dict) -> dict:
    """The nested overrides of `(name, text)` flags, typed by the options they name.

    `base` (the config file's mapping, or a saved run's) tells which algorithm, data set and model
    the typed options belong to when the command line does not name them.
    """
    # `--model.name X` is another spelling of `--model X`.
    pairs = [(name[:-len(".name")] if name.endswith(".name") and name[:-len(".name")] in SECTIONS
              else name, value) for name, value in pairs]
    names = {}
    for name, value in pairs:
        if name in SECTIONS:
            names = options.merge(names, {name: {"name": value}})
    mapping = options.merge(base, names)
    overrides = dict(names)
    for name, text in pairs:
        if name in SECTIONS:
            continue
        dotted = name.replace("-", "_")
        if "." not in dotted:
            if name not in _RUN_FIELDS:
                raise OptionError(name.replace("-", "_"), text, "unknown option; see "
                                  "`fedjax-lab run --help`")
            dotted = f"run.{_RUN_FIELDS[name]}"
        try:
            annotation = run_config.override_annotation(dotted, mapping)
        except OptionError as error:
            raise OptionError(error.path, text, error.expected) from None
        if text is None:
            value = True
        else:
            value = options.parse_text(dotted, text, annotation)
        overrides = options.merge(overrides, options.nest(dotted, value))
    return overrides


def _run(argv: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    pairs = _split_flags(argv, {"allow-divergence", "run.allow_divergence"})
    special = {name: value for name, value in pairs if name in ("config", "resume")}
    pairs = [(name, value) for name, value in pairs if name not in ("config", "resume")]
    if "config" in special and "resume" in special:
        raise UsageError("--config and --resume exclude each other: a resumed run keeps its "
                         "saved configuration")
    resume_dir = special.get("resume")
    file = special.get("config")
    if resume_dir is not None:
        file = os.path.join(resume_dir, CONFIG_FILE)
    base = {} if file is None else run_config.read_config_file(file)
    overrides = parse_overrides(pairs, base)
    if resume_dir is not None:
        overrides = options.merge(overrides, {"run": {"output": resume_dir}})
    config = run_config.config_from_sources(file, overrides)
    result = run_config.run(config, resume=resume_dir is not None)
    final = result.summary["final"]["test"]
    views = "".join(f", {view} {final[view]['accuracy']:.4f}" for view in ("global", "adapted")
                    if view in final)
    tokens = result.summary["counted"] == "tokens"
    perplexity = f", perplexity {final['perplexity']:.3f}" if tokens else ""
    print(f"{config.algorithm.name} on {config.data.name}: test {'token ' if tokens else ''}"
          f"accuracy {final['accuracy']:.4f}{perplexity} (per client mean "
          f"{final['client_accuracy_mean']:.4f}, min {final['client_accuracy_min']:.4f}{views}) "
          f"after {config.run.rounds} rounds in {result.seconds:.1f} s")
    return 0


def _takes_tuple(annotation) -> bool:
    kinds = getattr(annotation, "__args__", (annotation,))
    return any(kind is tuple or getattr(kind, "__origin__", None) is tuple for kind in kinds)


def _sweep(argv: list[str]) -> int:
    from fedjax_lab import sweep as sweeps
    from fedjax_lab.sweep_grid import parse_seeds

    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    pairs = _split_flags(argv, {"allow-divergence", "run.allow_divergence"})
    own = ("config", "resume", "seeds", "metric", "points-per-program", "chunks-at-once",
           "memory-budget")
    special = {name: value for name, value in pairs if name in own}
    pairs = [(name, value) for name, value in pairs if name not in own]
    counts = {}
    for flag, name in (("points-per-program", "points_per_program"),
                       ("chunks-at-once", "chunks_at_once"),
                       ("memory-budget", "memory_budget_bytes")):
        if special.get(flag) is not None:  # checked by the sweep, before it writes anything
            counts[name] = options.parse_text(flag, special[flag], int)
    if "resume" in special:
        if set(special) - {"resume", "chunks-at-once"} or pairs:
            raise UsageError("--resume takes no other option than --chunks-at-once: a sweep "
                             "resumes as it was saved")
        folder = special["resume"]
        path = os.path.join(folder, sweeps.SWEEP_FILE)
        if not os.path.exists(path):
            raise UsageError(f"cannot resume {folder!r}: it has no {sweeps.SWEEP_FILE}")
        with open(path) as f:
            saved = json.load(f)
        summary = sweeps.sweep(saved["base"], saved["seeds"], saved["grid"], folder,
                               metric=saved["metric"],
                               points_per_program=saved["points_per_program"],
                               memory_budget_bytes=saved.get("memory_budget_bytes"), resume=True,
                               chunks_at_once=counts.get("chunks_at_once"))
        print(_table(summary), end="")
        return 0
    base = {} if "config" not in special else run_config.read_config_file(special["config"])
    # The names chosen (--algorithm X) type the options; "a,b,c" lists a grid option's values.
    mapping = options.merge(base, parse_overrides(
        [(name, value) for name, value in pairs if name in SECTIONS or name.endswith(".name")],
        base))
    single, grid = [], {}
    for name, text in pairs:
        dotted = name.replace("-", "_")
        if "." not in dotted and name in _RUN_FIELDS:
            dotted = f"run.{_RUN_FIELDS[name]}"
        if text is None or "," not in text or "." not in dotted or dotted.endswith(".name"):
            single.append((name, text))
            continue
        annotation = run_config.override_annotation(dotted, mapping)
        if _takes_tuple(annotation):
            single.append((name, text))
        else:
            grid[dotted] = [options.parse_text(dotted, part.strip(), annotation)
                            for part in text.split(",")]
    mapping = options.merge(base, parse_overrides(single, base))
    output = mapping.get("run", {}).pop("output", None)
    if output is None:
        raise UsageError("a sweep writes one folder per grid point: give --output DIR")
    seeds = parse_seeds(special.get("seeds", "0"))
    summary = sweeps.sweep(mapping, seeds, grid, output, metric=special.get("metric", "accuracy"),
                           **counts)
    print(_table(summary), end="")
    return 0


def _table(summary: dict) -> str:
    from fedjax_lab.sweep_report import table

    return table(summary)


def _options_text(config, section: str) -> list[str]:
    return [f"  {_flag(f'{section}.{path}')} {default!r}  [{kind}"
            f"{', sweepable' if sweepable else ''}] {doc}"
            for path, kind, default, doc, sweepable in options.describe(config)]


def _list(argv: list[str]) -> int:
    registries = run_config.registries()
    if len(argv) > 1:
        raise UsageError("usage: fedjax-lab list [NAME]")
    if argv:
        (name,) = argv
        found = [(section, registry[name]) for section, registry in registries.items()
                 if name in registry]
        if not found:
            every = ", ".join(n for registry in registries.values() for n in registry)
            return _error(f"{name!r} is not registered; registered: {every}")
        for section, spec in found:
            print(f"{section} {name}: {spec.summary}")
            if getattr(spec, "paper", None):
                print(f"  {spec.paper}")
            print("\n".join(_options_text(spec.config, section)))
        return 0
    titles = {"algorithm": "algorithms", "data": "data sets", "model": "models"}
    for section, registry in registries.items():
        print(f"{titles[section]} (--{section} NAME; `fedjax-lab list NAME` for options):")
        for name, spec in registry.items():
            tags = []
            if section == "algorithm" and spec.model_kind == "split":
                tags.append("needs a split model")
            if section == "algorithm" and spec.trains_model_state:
                tags.append("trains dropout and BatchNorm models")
            if section == "model" and spec.kind == "split":
                tags.append("split")
            if section == "model" and spec.next_token:
                tags.append("text")
            if section == "algorithm" and spec.class_labels_only is not None:
                tags.append("class labels only")
            tag = f" [{', '.join(tags)}]" if tags else ""
            print(f"  {name:14s} {spec.summary}{tag}")
            if section == "algorithm":
                print(f"  {'':14s} {spec.paper}")
                print(f"  {'':14s} options: " + " ".join(
                    f"{path}={default!r}" for path, _, default, _, _ in
                    options.describe(spec.config)))
    print("run options (--run.NAME or --NAME):")
    print("\n".join(_options_text(RunOptions, "run")))
    return 0


def _describe(argv: list[str]) -> int:
    from fedjax_lab.data.describe import describe, format_description, plot_label_distribution

    if not argv or argv[0] != "describe":
        raise UsageError("usage: fedjax-lab data describe [--data NAME] [--data.OPTION VALUE] "
                         "[--seed N] [--plot FILE.png] [--json]")
    pairs = _split_flags(argv[1:], {"json"})
    extra = {name: value for name, value in pairs if name in ("plot", "json", "config")}
    pairs = [(name, value) for name, value in pairs if name not in extra]
    for name, _ in pairs:
        if name != "data" and not name.startswith("data.") and name not in ("seed",
                                                                             "data-seed"):
            raise UsageError(f"--{name} does not describe a data set; use --data NAME, "
                             "--data.OPTION VALUE, --seed N")
    base = {}
    if extra.get("config"):
        base = {key: value for key, value in run_config.read_config_file(
            extra["config"]).items() if key in ("data", "run")}
    config = run_config.config_from_sources(None, options.merge(base, parse_overrides(pairs,
                                                                                      base)))
    seed = config.run.seed if config.run.data_seed is None else config.run.data_seed
    dataset = run_config.registries()["data"][config.data.name].load(config.data.options, seed)
    description = describe(dataset)
    if "json" in extra:
        print(json.dumps(description, indent=2))
    else:
        print(format_description(description))
    if extra.get("plot"):
        plot_label_distribution(dataset, extra["plot"])
        print(extra["plot"])
    return 0


def _plot(argv: list[str]) -> int:
    from fedjax_lab.plotting import RunFolderError, plot_runs

    output = None
    if "--output" in argv:
        at = argv.index("--output")
        if at + 1 >= len(argv):
            raise UsageError("--output needs a value")
        output = argv[at + 1]
        argv = argv[:at] + argv[at + 2:]
    if not argv:
        raise UsageError("usage: fedjax-lab plot RUN_DIR [RUN_DIR ...] [--output FILE_OR_DIR]")
    try:
        paths = plot_runs(argv, output)
    except (RunFolderError, ImportError) as error:
        return _error(str(error))
    print("\n".join(paths))
    return 0


COMMANDS = {"run": _run, "sweep": _sweep, "list": _list, "data": _describe, "plot": _plot}
# Commands that compile, and so use the persistent compilation cache.
COMPILING = ("run", "sweep")


def compile_cache_folder(argv: list[str]) -> tuple[str | None, list[str]]:
    """The persistent compilation cache's folder (None: off) and `argv` without the flag."""
    folder = os.environ.get("FEDJAX_LAB_COMPILE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fedjax_lab", "jax")
    rest = []
    tokens = iter(argv)
    for token in tokens:
        if token == "--compile-cache" or token.startswith("--compile-cache="):
            folder = token.partition("=")[2] or next(tokens, None)
            if folder is None:
                raise UsageError("--compile-cache needs a folder or off")
        else:
            rest.append(token)
    return (None if folder == "off" else folder), rest


def use_compile_cache(folder: str | None) -> None:
    """Turns JAX's persistent compilation cache on in `folder` for every program (None: off)."""
    import jax

    if folder is None:
        return
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        return _error(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}")
    try:
        if command in COMPILING:
            folder, rest = compile_cache_folder(rest)
            use_compile_cache(folder)
        return COMMANDS[command](rest)
    except OptionError as error:
        return _option_error(error)
    except UsageError as error:
        return _error(str(error))
    except DivergenceError as error:
        return _error(str(error), code=3)
    except (ValueError, OSError, CheckpointError, ConfigMismatchError) as error:
        return _error(str(error))


if __name__ == "__main__":
    sys.exit(main())
