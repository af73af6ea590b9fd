#!/usr/bin/env bash
# The default study with pruning off: every trial trains all its epochs.
exec python -m mnist_search.study --study-name mnist-no-pruning --pruner none "$@"
