#!/usr/bin/env bash
# A long search: more trials, more epochs per trial. Resumable: rerun the same command.
exec python -m mnist_search.study --study-name mnist-long --trials 200 --epochs 20 "$@"
