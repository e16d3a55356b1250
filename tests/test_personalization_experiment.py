"""experiments/personalization.py runs both experiment families and combines their results."""

import json

from experiments import ditto_fedamp, fedproto_pfedhn, personalization


def test_driver_runs_both_families_into_their_folders(tmp_path, monkeypatch):
    calls = {}

    def fake(name):
        def run(rounds, seeds, output, **options):
            calls[name] = (rounds, list(seeds), output, options)
            return {"family": name}
        return run

    monkeypatch.setattr(ditto_fedamp, "run", fake("ditto_fedamp"))
    monkeypatch.setattr(fedproto_pfedhn, "run", fake("fedproto_pfedhn"))
    personalization.main(["--rounds", "7", "--seeds", "1", "2", "--fedamp-rounds", "3",
                          "--pfedhn-rounds", "5", "--output", str(tmp_path)])
    assert calls["ditto_fedamp"] == (7, [1, 2], str(tmp_path / "ditto_fedamp"),
                                     {"fedamp_rounds": 3})
    assert calls["fedproto_pfedhn"] == (7, [1, 2], str(tmp_path / "fedproto_pfedhn"),
                                        {"pfedhn_rounds": 5})
    with open(tmp_path / "results.json") as f:
        assert json.load(f) == {"ditto_fedamp": {"family": "ditto_fedamp"},
                                "fedproto_pfedhn": {"family": "fedproto_pfedhn"}}
