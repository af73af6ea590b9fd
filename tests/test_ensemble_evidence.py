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


def test_retrain_evidence_own_seeds_give_each_member_of_each_seed_its_own():
    seeds = retrain_evidence.member_seeds
    assert sorted(sum((seeds(7, s, 4, own=True) for s in range(3)), [])) == list(range(7, 19))
    assert seeds(7, 2, 4, own=False) == [9] * 4  # one seed a row, as the champion trains them


def test_a_shift_moves_every_pixel_one_place_and_fills_the_edge_with_background():
    x = torch.arange(2 * 784, dtype=torch.float32).reshape(2, 784)
    images = x.reshape(2, 28, 28)
    down = retrain_evidence.shift(x, 1, 0, -5.0).reshape(2, 28, 28)
    assert torch.equal(down[:, 1:], images[:, :-1]) and (down[:, 0] == -5.0).all()
    left = retrain_evidence.shift(x, 0, -1, -5.0).reshape(2, 28, 28)
    assert torch.equal(left[:, :, :-1], images[:, :, 1:]) and (left[:, :, -1] == -5.0).all()
    assert torch.equal(retrain_evidence.shift(x, 0, 0, -5.0), x)


def test_greedy_selection_weights_members_by_the_steps_that_chose_them():
    y = torch.arange(20) % 10
    good = F.one_hot(y, 10).float() * 0.9 + 0.01  # right everywhere
    bad = F.one_hot((y + 1) % 10, 10).float() * 0.9 + 0.01  # wrong everywhere
    weights = retrain_evidence.greedy_weights([bad, good], y, steps=4)
    assert weights == [0.0, 1.0]  # adding the wrong member never scores better
    # weights sum to 1, and the weighted ensemble is the weighted mean of the members' outputs
    mixed = retrain_evidence.greedy_weights([good, good * 0.5 + bad * 0.5], y, steps=3)
    assert sum(mixed) == pytest.approx(1.0)
    ensemble = retrain_evidence.weighted([good, bad], [0.75, 0.25])
    assert torch.allclose(ensemble, 0.75 * good + 0.25 * bad)


def test_inference_levers_score_the_shifted_mean_and_greedy_on_held_out_halves():
    y = torch.arange(40) % 10
    right_p = F.one_hot(y, 10).float()
    wrong_p = F.one_hot((y + 1) % 10, 10).float()
    flaky = torch.stack([right_p] + [wrong_p] * 4)  # right on the image, wrong on its 4 shifts
    alone = retrain_evidence.inference_levers([flaky], y)
    assert alone["all"] == 1.0 and alone["all, shifted"] == 0.0
    # two members wrong everywhere outvote one right one, unless greedy leaves them out
    wrong, steady = torch.stack([wrong_p] * 5), torch.stack([right_p] * 5)
    found = retrain_evidence.inference_levers([wrong, wrong, steady], y)
    assert found["all"] == found["all, held out"] == 0.0
    assert found["greedy, held out"] == 1.0
