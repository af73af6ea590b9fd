"""Run a command of this project with the CNN space's top edges widened: `lr` up to 3e-2,
`channels_1` up to 64, `head_width` up to 256 (docs/search-space.md, "The space's top edges").

    python experiments/widen_space.py mnist_search.study --trials 50 --no-champion
    python experiments/widen_space.py experiments/retrain_evidence.py --epochs 10 --k 4 --seeds 3

The first argument is a module (run as `python -m`) or a script path; the rest are its flags.
Only the upper bounds of those three parameters change, wherever a trial suggests them; run it
in a fresh folder, as the study's names are the default ones.
"""

import runpy
import sys

import optuna

HIGH = {"lr": 3e-2, "channels_1": 64, "head_width": 256}
_float, _int = optuna.trial.Trial.suggest_float, optuna.trial.Trial.suggest_int


def suggest_float(self, name, low, high, **kwargs):
    return _float(self, name, low, HIGH.get(name, high), **kwargs)


def suggest_int(self, name, low, high, **kwargs):
    return _int(self, name, low, HIGH.get(name, high), **kwargs)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    optuna.trial.Trial.suggest_float, optuna.trial.Trial.suggest_int = suggest_float, suggest_int
    target, sys.argv = sys.argv[1], sys.argv[1:]
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
