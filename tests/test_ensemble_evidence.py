"""The evidence for `--ensemble K` and `--retrain-epochs`: validation only, honestly held out."""

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("evidence", ROOT / "experiments/ensemble_evidence.py")
evidence = importlib.util.module_from_spec(spec)
spec.loader.exec_module(evidence)


def test_halves_give_each_class_half_its_images_and_cover_validation_once():
    y = torch.tensor([0] * 10 + [1] * 7 + [2] * 4)[torch.randperm(21)]
    a, b = evidence.halves(y)
    assert sorted(torch.cat([a, b]).tolist()) == list(range(len(y)))
    assert [int((y[a] == c).sum()) for c in range(3)] == [5, 3, 2]
    assert torch.equal(a, evidence.halves(y)[0])  # a fixed seed: the same halves every run


def test_a_member_lucky_on_one_half_is_scored_on_the_other():
    y = torch.arange(200) % 10
    a, b = evidence.halves(y)
    wrong = (y + 1) % 10
    lucky = F.one_hot(y, 10).float()  # right on half a, wrong on half b
    lucky[b] = F.one_hot(wrong[b], 10).float()
    steady = F.one_hot(y, 10).float()  # right on 9 of every 10 images of each half
    misses = torch.cat([a[::10], b[::10]])
    steady[misses] = F.one_hot(wrong[misses], 10).float()
    on_a = evidence.accuracy([steady[a]], y[a])
    # ranked on a, lucky (100%) beats steady and scores 0 on b; ranked on b, steady wins
    assert evidence.held_out([lucky, steady], y, 1) == (0.0 + on_a) / 2
    # as the champion picks, on all of validation, steady (90%) beats lucky (50%)
    assert evidence.accuracy([steady], y) > evidence.accuracy([lucky], y) == 0.5
    # an ensemble is scored on the mean of its members' probabilities
    assert evidence.accuracy([lucky, steady], y) == evidence.accuracy([(lucky + steady) / 2], y)


retrain_spec = importlib.util.spec_from_file_location(
    "retrain_evidence", ROOT / "experiments/retrain_evidence.py"
)
retrain_evidence = importlib.util.module_from_spec(retrain_spec)
retrain_spec.loader.exec_module(retrain_evidence)


def test_retrain_evidence_scores_each_member_and_the_ensembles_of_the_best_k():
    from mnist_search.train import fit, predict_logits
    from tests.helpers import CNN_CONFIG, MLP_CONFIG, band_data

    data = band_data()
    configs = [MLP_CONFIG, CNN_CONFIG]
    alone, together = retrain_evidence.scores(configs, data, "cpu")
    # fit is seeded: the same configs train the same networks again here
    val = data.val.features()
    right = [
        (predict_logits(fit(c, data).model, val).argmax(1) == data.val.y).float().mean()
        for c in configs
    ]
    assert alone == pytest.approx(sum(right).item() / 2)
    assert len(together) == 2 and together[0] == pytest.approx(right[0].item())


def test_retrain_evidence_variants_parse_each_fields_type_and_refuse_unknown_fields():
    parse = retrain_evidence.variant
    assert parse("base") == {}
    assert parse("ema=0.999,channels=24-48,depth=2,precision=fp32") == {
        "ema": 0.999,
        "channels": (24, 48),
        "depth": 2,
        "precision": "fp32",
    }
    for bad in ("widths=3", "depth=", "depth"):
        with pytest.raises(argparse.ArgumentTypeError, match="FIELD=VALUE"):
            parse(bad)
