import json

import pytest

from selfevo.evaluate import ROUGE_KEYS, SeedBLEU4, SeedROUGE, bleu4, rouge
from tests.helpers import SHARED

CONFORMANCE = SHARED / "data" / "metric_conformance.json"
pytestmark = pytest.mark.skipif(not CONFORMANCE.exists(), reason="../shared/data not present")


def load():
    return json.loads(CONFORMANCE.read_text(encoding="utf-8"))


def test_every_conformance_pair_matches_to_1e4():
    for pair in load()["pairs"]:
        assert bleu4(pair["pred"], pair["ref"]) == pytest.approx(pair["bleu-4"], abs=1e-4)
        scores = rouge(pair["pred"], pair["ref"])
        for key in ROUGE_KEYS:
            assert scores[key] == pytest.approx(pair[key], abs=1e-4), (key, pair["pred"][:30])


def test_metric_classes_reproduce_the_means_across_updates():
    data = load()
    preds, refs = [p["pred"] for p in data["pairs"]], [p["ref"] for p in data["pairs"]]
    bleu, rouge_metric = SeedBLEU4(), SeedROUGE()
    half = len(preds) // 2
    for chunk in (slice(0, half), slice(half, None)):  # two batches, as a test loop would send them
        bleu.update(preds[chunk], refs[chunk])
        rouge_metric.update(preds[chunk], refs[chunk])
    assert float(bleu.compute()) == pytest.approx(data["mean"]["bleu-4"], abs=1e-4)
    for key, value in rouge_metric.compute().items():
        assert float(value) == pytest.approx(data["mean"][key], abs=1e-4)


def test_blank_side_scores_zero_rouge():
    assert rouge("", "some words") == {k: 0.0 for k in ROUGE_KEYS}
    assert rouge("identical text", "identical text")["rouge-l"] == 100.0
