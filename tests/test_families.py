"""The model families, augmentation and the ensemble: tiny synthetic data, CPU, seconds."""

import dataclasses
import sys
from pathlib import Path

import optuna
import pytest
import torch

from mnist_search import train as train_module
from mnist_search.augment import random_affine
from mnist_search.data import Data
from mnist_search.model import CNN, MLP, PixelClassifier, training_flops_per_sample
from mnist_search.ship import export_folder, onnx_max_error
from mnist_search.space import DEFAULTS, StaleParams, config_from_params, suggest_config
from mnist_search.train import TrainConfig, build_model, fit
from tests.helpers import CNN_CONFIG, MLP_CONFIG, band_data, synthetic_images

BF16_CNN = dataclasses.replace(CNN_CONFIG, precision="bf16")


@pytest.mark.parametrize(
    "config", [MLP_CONFIG, CNN_CONFIG, BF16_CNN], ids=["mlp", "cnn", "cnn-bf16"]
)
def test_each_family_trains_and_beats_chance_by_far(config):
    result = fit(config, band_data())
    assert isinstance(result.model, MLP if config.family == "mlp" else CNN)
    assert result.history[-1]["val_accuracy"] > 0.9  # chance is 0.1


def test_bf16_runs_the_training_forward_in_bfloat16_and_keeps_float32_weights(monkeypatch):
    """The convs' and linears' outputs while training are bfloat16 (autocast); evaluation runs
    in float32, and the weights stay float32."""
    seen = []  # (training?, output dtype) of every conv and linear layer call
    real_build = train_module.build_model

    def build(config):
        net = real_build(config)
        for layer in net.modules():
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
                layer.register_forward_hook(lambda m, i, out: seen.append((m.training, out.dtype)))
        return net

    monkeypatch.setattr(train_module, "build_model", build)
    model = fit(dataclasses.replace(BF16_CNN, epochs=1), band_data()).model
    assert {dtype for training, dtype in seen if training} == {torch.bfloat16}
    assert {dtype for training, dtype in seen if not training} == {torch.float32}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    seen.clear()
    fit(dataclasses.replace(CNN_CONFIG, epochs=1), band_data())  # fp32: no bfloat16 anywhere
    assert {dtype for _, dtype in seen} == {torch.float32}


def test_a_cnn_trains_with_augmentation_and_counts_its_flops():
    config = TrainConfig(**{**CNN_CONFIG.to_dict(), "augment": 0.5})
    assert fit(config, band_data()).history[-1]["val_accuracy"] > 0.9
    # two stride-2 convs (28 -> 14 -> 7) and the head; 3 x 2 x multiply-adds, as bench counts
    macs = 14 * 14 * 4 * 9 + 7 * 7 * 8 * 4 * 9 + 7 * 7 * 8 * 16 + 16 * 10
    assert training_flops_per_sample(build_model(CNN_CONFIG)) == 6 * macs


def test_depth_adds_3x3_blocks_that_keep_each_stages_maps_and_counts_their_flops():
    config = dataclasses.replace(CNN_CONFIG, depth=3)
    net = build_model(config)
    assert net.features(torch.zeros(3, 1, 28, 28)).shape == (3, 8, 7, 7)  # as at depth 1
    # two more 3x3 convs in each stage: 4 maps of 14x14, then 8 of 7x7; multiply-adds
    extra = 2 * (14 * 14 * 4 * 4 * 9 + 7 * 7 * 8 * 8 * 9)
    base = training_flops_per_sample(build_model(CNN_CONFIG))
    assert training_flops_per_sample(net) == base + 6 * extra
    assert fit(config, band_data()).history[-1]["val_accuracy"] > 0.9
    assert config.describe() == "CNN 4-8 3x3, 3 convs a stage, head 16"
    with pytest.raises(ValueError, match="depth"):
        dataclasses.replace(MLP_CONFIG, depth=2)


def test_a_stem_is_one_full_resolution_3x3_block_before_the_stages_and_counts_its_flops():
    config = dataclasses.replace(CNN_CONFIG, stem=2)
    net = build_model(config)
    assert net.features(torch.zeros(3, 1, 28, 28)).shape == (3, 8, 7, 7)  # as without
    # the stem's 2 maps of 28x28 from 1 channel, and the first stage now reads 2 channels
    extra = 28 * 28 * 2 * 9 + 14 * 14 * 4 * 9
    base = training_flops_per_sample(build_model(CNN_CONFIG))
    assert training_flops_per_sample(net) == base + 6 * extra
    assert config.describe() == "CNN 3x3 2, 4-8 3x3, head 16"
    with pytest.raises(ValueError, match="stem"):
        dataclasses.replace(MLP_CONFIG, stem=8)


@pytest.mark.parametrize(
    "strengths",
    [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.5, 0.5, 0.5)],
    ids=["affine", "shear", "elastic", "all"],
)
def test_augmentation_off_is_the_identity_and_on_keeps_shapes_and_is_seeded(strengths):
    """Each distortion (affine, shear, elastic) sees images only, so labels are untouched."""
    x = band_data().train.features()[:64]
    assert random_affine(x, 0.0, -1.0, 0.0, 0.0) is x
    torch.manual_seed(3)
    a = random_affine(x, *strengths[:1], -1.0, *strengths[1:])
    torch.manual_seed(3)
    b = random_affine(x, *strengths[:1], -1.0, *strengths[1:])
    assert a.shape == x.shape and a.dtype == x.dtype and torch.equal(a, b)
    assert not torch.equal(a, x)
    # an all-background image stays background wherever it is moved to
    blank = torch.full((2, 784), -1.0)
    assert torch.allclose(
        random_affine(blank, *strengths[:1], -1.0, *strengths[1:]), blank, atol=1e-6
    )


def test_shear_and_elastic_off_draw_what_the_affine_distortion_drew_before():
    """A config without them trains on exactly the batches it did before they existed."""
    x = band_data().train.features()[:16]
    torch.manual_seed(0)
    before = random_affine(x, 0.4, -1.0)
    torch.manual_seed(0)
    assert torch.equal(random_affine(x, 0.4, -1.0, 0.0, 0.0), before)


def test_the_weight_average_is_the_hand_computed_one_after_two_steps():
    """Two SGD steps on one weight w (lr 1, gradient 1 each): w goes 1 -> 0 -> -1. With decay
    0.5 the warm-up decays are min(0.5, 2/11) and min(0.5, 3/12): the average is
    1 -> (2/11)1 + (9/11)0 -> (3/12)(2/11) + (9/12)(-1)."""
    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(1.0)
    average = train_module.WeightAverage(net, decay=0.5)
    expected = 1.0
    for step, w in ((1, 0.0), (2, -1.0)):
        with torch.no_grad():
            net.weight.fill_(w)
        average.update()
        d = min(0.5, (1 + step) / (10 + step))
        expected = d * expected + (1 - d) * w
        assert average.model.weight.item() == pytest.approx(expected, abs=1e-7)
    assert expected == pytest.approx(3 / 12 * 2 / 11 - 9 / 12, abs=1e-12)
    assert net.weight.item() == -1.0  # the model itself is not touched


def test_fit_with_ema_evaluates_and_returns_the_average():
    config = dataclasses.replace(CNN_CONFIG, ema=0.9)
    seen = []
    result = fit(config, band_data(), on_epoch_end=lambda e, m, model: seen.append(model))
    plain = fit(CNN_CONFIG, band_data()).model  # the same steps, the last weights
    assert all(model is result.model for model in seen)  # the hook saw what is returned
    assert not any(p.requires_grad for p in result.model.parameters())
    assert not all(
        torch.equal(a, b)
        for a, b in zip(result.model.parameters(), plain.parameters(), strict=True)
    )
    assert result.history[-1]["val_accuracy"] > 0.9


@pytest.mark.parametrize(
    ("features", "vendor", "expected"),
    [
        ((), "GenuineIntel", "fp32"),  # AVX2 only: bf16 emulated
        (("avx512_bf16",), "GenuineIntel", "fp32"),  # native, but measured slower
        (("avx512_bf16", "amx_tile"), "GenuineIntel", "bf16"),  # AMX tiles compute bf16
        (("avx512_bf16",), "AuthenticAMD", "bf16"),  # EPYC: measured faster
        ((), "AuthenticAMD", "fp32"),
    ],
)
def test_auto_precision_is_bf16_on_a_cpu_only_where_it_was_measured_faster(
    monkeypatch, features, vendor, expected
):
    from mnist_search import machine

    monkeypatch.setattr(machine, "_cpu_has", lambda feature: feature in features)
    monkeypatch.setattr(machine, "cpu_vendor", lambda: vendor)
    auto = dataclasses.replace(CNN_CONFIG, precision="auto")
    assert train_module.forward_precision(auto, "cpu") == expected
    assert machine.native_bf16(torch.device("cpu")) == bool(features)
    assert train_module.forward_precision(BF16_CNN, "cpu") == "bf16"  # asked for: as asked
    assert train_module.forward_precision(CNN_CONFIG, "cpu") == "fp32"


def test_the_cpu_vendor_is_read_from_cpuinfo_or_left_empty(tmp_path):
    from mnist_search.machine import cpu_vendor

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n")
    assert cpu_vendor(cpuinfo) == "AuthenticAMD"
    cpuinfo.write_text("processor\t: 0\nCPU implementer\t: 0x41\n")  # an ARM CPU says none
    assert cpu_vendor(cpuinfo) == ""
    assert cpu_vendor(tmp_path / "absent") == ""  # not Linux


def test_the_ensemble_outputs_the_mean_of_its_members():
    torch.manual_seed(0)
    nets = [build_model(MLP_CONFIG), build_model(CNN_CONFIG)]
    ensemble = PixelClassifier(nets, mean=0.1, std=0.3).eval()
    pixels = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        members = [PixelClassifier(net, mean=0.1, std=0.3).eval()(pixels) for net in nets]
        assert torch.allclose(ensemble(pixels), (members[0] + members[1]) / 2, atol=1e-7)
        assert torch.allclose(ensemble(pixels), ensemble(pixels.reshape(5, 784).float()))


@pytest.mark.parametrize("kind", ["cnn", "ensemble"])
def test_onnx_matches_pytorch(kind, tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    nets = [build_model(CNN_CONFIG)] + ([build_model(MLP_CONFIG)] if kind == "ensemble" else [])
    model = PixelClassifier(nets, mean=0.13, std=0.31).eval()
    images = synthetic_images(64, seed=1)[0].reshape(64, 784)  # as crown exports: (N, 784)
    out = export_folder(model, {"kind": kind}, images, tmp_path / kind)
    assert onnx_max_error(model, out / "model.onnx", images) < 1e-5


def test_without_onnxruntime_the_onnx_check_is_skipped_with_a_note(tmp_path, monkeypatch, capsys):
    """`onnx` exports; only the check needs `onnxruntime`: a crown without it goes on."""
    model = PixelClassifier([build_model(TrainConfig(hidden=(8,)))], mean=0.13, std=0.31).eval()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # its import now raises ImportError
    assert onnx_max_error(model, tmp_path / "model.onnx", torch.zeros(2, 784)) is None
    assert "ONNX check skipped" in capsys.readouterr().err


@pytest.mark.parametrize("space", ["cnn", "all"])
def test_a_trials_params_rebuild_its_config(space):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(6):
        trial = study.ask()
        config = suggest_config(trial, epochs=5, seed=7, space=space)
        assert config_from_params(trial.params, 5, 7, space) == config
        study.tell(trial, 0.5)
    families = {config_from_params(t.params, 5, 7, space).family for t in study.trials}
    assert families == ({"cnn"} if space == "cnn" else {"mlp", "cnn"})


def test_the_mlp_space_samples_todays_params():
    trial = optuna.create_study().ask()
    config = suggest_config(trial, epochs=5, seed=0, space="mlp")
    assert (config.family, config.augment, config.precision) == ("mlp", 0, "fp32")
    widths = [f"width_{i}" for i in range(len(config.hidden))]
    # the same params in the same order: a seeded sampler draws them as it always did
    assert list(trial.params) == [
        "n_layers", *widths, "dropout", "activation", "optimizer", "lr", "weight_decay",
        "schedule", "label_smoothing", "batch_size",
    ]  # fmt: skip


def test_params_that_do_not_fit_the_space_are_refused_not_ignored():
    trial = optuna.create_study().ask()
    suggest_config(trial, epochs=5, seed=0, space="cnn")
    old = {**trial.params, "schedule": "constant"}  # searched for CNNs until commit 2378146
    with pytest.raises(StaleParams, match=r"\['schedule'\] are not in this version's --space cnn"):
        config_from_params(old, 5, 0, "cnn")
    missing = {k: v for k, v in trial.params.items() if k != "lr"}
    with pytest.raises(StaleParams, match="'lr'"):
        config_from_params(missing, 5, 0, "cnn")


def test_cnns_train_with_a_cosine_schedule_and_auto_precision_which_are_not_searched():
    trial = optuna.create_study().ask()
    config = suggest_config(trial, epochs=5, seed=0, space="cnn")
    assert (config.family, config.schedule, config.precision) == ("cnn", "cosine", "auto")
    assert {"schedule", "precision"}.isdisjoint(trial.params)


def test_bench_times_the_second_epoch_of_the_config_it_is_given(monkeypatch):
    from mnist_search import bench

    fitted, real_fit = [], bench.fit

    def spy(config, data, *args, **kwargs):
        result = real_fit(config, data, *args, **kwargs)
        fitted.append((config, result.history))
        return result

    monkeypatch.setattr(bench, "fit", spy)
    data = Data(band_data().train, None, 0.0, 1.0)  # no validation split: training alone
    cpu = torch.device("cpu")
    for change in ({}, {"augment": 1.0}, {"precision": "bf16"}):
        rate = bench.ours(data, 128, cpu, dataclasses.replace(bench.CNN_CONFIG, **change))
        config, history = fitted[-1]
        assert config == dataclasses.replace(bench.CNN_CONFIG, epochs=2, **change)
        assert rate == len(data.train) / history[1]["epoch_seconds"]  # the warm epoch
    bench.ours(data, 512, cpu)  # the MLP, at the batch size asked for
    assert fitted[-1][0].hidden == bench.HIDDEN and fitted[-1][0].batch_size == 512


def test_flags_left_out_take_their_spaces_defaults_and_names_follow_the_space():
    from mnist_search.search import SearchConfig

    for space, defaults in DEFAULTS.items():
        config = SearchConfig(space=space)
        assert config.epochs == defaults.epochs
        assert config.champion.ensemble == defaults.ensemble
        assert config.champion.retrain_epochs == defaults.retrain_epochs
        assert config.champion.retrain_depth == defaults.retrain_depth
        assert config.champion.retrain_channels == defaults.retrain_channels
        assert config.champion.retrain_augment == defaults.retrain_augment
        assert config.champion.retrain_lr_scale == defaults.retrain_lr_scale
        assert config.study_name == config.champion.register_as == f"mnist-{space}"
    assert SearchConfig().space == "cnn"
    # what is given wins, and the registered model follows the study's name
    given = SearchConfig(space="mlp", epochs=3, study_name="mine")
    assert (given.epochs, given.champion.register_as) == (3, "mine")


def test_a_workers_flags_parse_back_into_the_same_search():
    """Workers start with `to_argv`'s flags: parsed by the study command, they make the same
    config (without a champion: the first process crowns), resolved values included."""
    from mnist_search import cli, study
    from mnist_search.search import SearchConfig

    configs = [
        SearchConfig(),
        SearchConfig(space="mlp", trials=7, seed=3, timeout=60.0, workers=2, cuda_graphs=False,
                     storage="sqlite:///x.db", tracking_uri="http://127.0.0.1:5000",
                     data_dir=Path("elsewhere"), device="cpu", pruner="median", worker_id=1),
    ]  # fmt: skip
    for config in configs:
        flags = vars(study.build_parser().parse_args(config.to_argv()))
        assert flags.pop("no_champion") is True
        for name in cli.CHAMPION_FLAGS:
            flags.pop(name)
        assert SearchConfig(**flags, champion=None) == dataclasses.replace(config, champion=None)


def test_the_bench_command_prints_every_row_and_its_ratios(synthetic_mnist, capsys):
    from mnist_search import bench

    argv = ["--data-dir", str(synthetic_mnist), "--samples", "512", "--device", "cpu"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("device: cpu (CPU), torch threads: ")
    rates = {line[:66].strip(): float(line[66:].replace(",", "")) for line in out[2:9]}
    assert list(rates) == [
        "usual way: torchvision + DataLoader, batch 128",
        "ours: device-resident tensors, batch 128",
        "ours: device-resident tensors, batch 512",
        next(k for k in rates if k.startswith("ceiling: ")),
        "ours: CNN 16-32 5x5, head 128 (5.4 MFLOP), batch 128",
        "the same, augmented (strength 1)",
        "the same, in bf16 (autocast)",
    ]
    assert all(rate > 0 for rate in rates.values())
    ratio = float(out[9].split()[-1].rstrip("x"))  # speed-up over the usual way
    usual, ours = (
        rates["usual way: torchvision + DataLoader, batch 128"],
        rates[out[3][:66].strip()],
    )
    assert out[9].startswith("speed-up over the usual way")
    # the ratio of the unrounded rates, to 0.1: within what rounding each printed figure allows
    assert (ours - 0.5) / (usual + 0.5) - 0.05 <= ratio <= (ours + 0.5) / (usual - 0.5) + 0.05


def test_the_champion_retrains_cnn_members_at_the_depth_widths_and_augment_given_mlps_as_found():
    from mnist_search import champion, cli
    from mnist_search import study as study_command

    study = optuna.create_study(direction="maximize")
    study.set_user_attr("space", "all")
    cnn = {"family": "cnn", "channels_0": 8, "channels_1": 16, "kernel": 3, "head_width": 32}
    mlp = {"family": "mlp", "n_layers": 1, "width_0": 128}
    shared = {"dropout": 0.1, "activation": "relu", "optimizer": "adam", "lr": 1e-3,
              "weight_decay": 1e-5, "label_smoothing": 0.0, "augment": 0.25,
              "batch_size": 128}  # fmt: skip
    for params in (cnn | shared, mlp | shared | {"schedule": "cosine"}):
        study.enqueue_trial(params)
        study.optimize(lambda t: (suggest_config(t, 2, 0, "all"), 0.5)[1], n_trials=1)
    members = champion.members_of(study, 2)
    deep, plain = champion.retrain_configs(
        study, members, 3, depth=2, channels=(24, 48), augment=0.5, lr_scale=0.5
    )
    assert (deep.family, deep.depth, deep.channels, deep.kernel, deep.epochs, deep.augment) == (
        "cnn", 2, (24, 48), 3, 3, 0.5
    )  # fmt: skip
    assert (plain.family, plain.depth, plain.hidden, plain.augment) == ("mlp", 1, (128,), 0.25)
    assert deep.lr == plain.lr == 5e-4  # both at half the searched 1e-3
    searched = champion.retrain_configs(study, members, 3)[0]  # all as searched
    assert (searched.depth, searched.channels, searched.augment) == (1, (8, 16), 0.25)
    assert searched.lr == 1e-3
    # flags: widths, strength, or 'searched'; left out, the space's defaults
    argv = ["--retrain-channels", "searched", "--retrain-depth", "1", "--retrain-augment"]
    for given, strength in (("searched", "searched"), ("0", 0.0), ("0.75", 0.75)):
        args = study_command.build_parser().parse_args([*argv, given])
        config = champion.ChampionConfig(**{k: getattr(args, k) for k in cli.CHAMPION_FLAGS})
        resolved = config.resolved("cnn", "s")
        assert (resolved.retrain_channels, resolved.retrain_depth) == ((), 1)
        assert resolved.retrain_augment == strength
    default = champion.ChampionConfig().resolved("cnn", "s")
    assert (default.retrain_channels, default.retrain_depth, default.retrain_augment) == (
        DEFAULTS["cnn"].retrain_channels, DEFAULTS["cnn"].retrain_depth, 0.5
    )  # fmt: skip
    assert default.retrain_lr_scale == 0.5
    mlp = champion.ChampionConfig().resolved("mlp", "s")
    assert (mlp.retrain_augment, mlp.retrain_lr_scale) == ("searched", 1.0)  # as the original
    assert champion.ChampionConfig(retrain_lr_scale=2).resolved("cnn", "s").retrain_lr_scale == 2
