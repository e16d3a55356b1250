"""The personalised-FL experiments of ALGORITHMS.md §4, §7, §8 and §9 in one command.

Runs `experiments.ditto_fedamp` (Ditto vs FedAvg, FedAvg+fine-tuning and Local under
Dirichlet(0.1), clean and with 20% random-label clients; FedAMP's attention on three hidden client
groups) and `experiments.fedproto_pfedhn` (FedProto vs Local and FedAvg on ways/shots digits;
pFedHN and pFedHN-PC vs FedAvg and Local with two classes per client), each into its own
sub-folder of `--output` with its JSON and PNGs, and writes a combined `results.json`.

    python -m experiments.personalization [--rounds 100] [--seeds 0 1 2] [--output DIR]
"""

import os

from experiments import ditto_fedamp, fedproto_pfedhn
from experiments.common import experiment_parser, parse_args
from fedjax_lab.experiment import write_json_atomic


def run(rounds: int = 100, seeds=(0,), output: str = "results/personalization", *,
        fedamp_rounds: int = 40, pfedhn_rounds: int = 100) -> dict:
    """Both experiment families for every seed; returns and writes the combined results."""
    os.makedirs(output, exist_ok=True)
    results = {
        "ditto_fedamp": ditto_fedamp.run(rounds, seeds, os.path.join(output, "ditto_fedamp"),
                                         fedamp_rounds=fedamp_rounds),
        "fedproto_pfedhn": fedproto_pfedhn.run(rounds, seeds,
                                               os.path.join(output, "fedproto_pfedhn"),
                                               pfedhn_rounds=pfedhn_rounds),
    }
    write_json_atomic(os.path.join(output, "results.json"), results)
    return results


def main(argv=None) -> None:
    parser = experiment_parser(__doc__, rounds=100, seeds=[0], output="results/personalization")
    parser.add_argument("--fedamp-rounds", type=int, default=40)
    parser.add_argument("--pfedhn-rounds", type=int, default=100)
    args = parse_args(parser, argv, counts=("rounds", "fedamp_rounds", "pfedhn_rounds"))
    run(args.rounds, args.seeds, args.output, fedamp_rounds=args.fedamp_rounds,
        pfedhn_rounds=args.pfedhn_rounds)
    print(f"results in {args.output}/ (ditto_fedamp/, fedproto_pfedhn/, results.json)")


if __name__ == "__main__":
    main()
