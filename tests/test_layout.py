"""The package's imports point one way: no module imports one that imports it back."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("import_graph", ROOT / "experiments/import_graph.py")
import_graph = importlib.util.module_from_spec(spec)
spec.loader.exec_module(import_graph)


def test_the_package_has_no_import_cycle_and_its_base_modules_stand_alone(capsys):
    assert import_graph.main([str(ROOT / "mnist_search")]) == 0
    graph = import_graph.imports_of(ROOT / "mnist_search")
    # the modules everything stands on import nothing else of the package
    leaves = ("fetch", "interrupts", "model", "augment", "summary", "machine", "retry")
    for base in leaves:
        assert graph[base] == set(), base
    # the stores: opening and tracking stand on the retries alone
    assert graph["tracking"] == {"retry"} and graph["rdb"] == {"retry"}
    assert graph["storage"] == {"rdb", "retry"}
    assert graph["cli"] == {"fetch", "machine"}  # argparse helpers over leaves, nothing else
    assert graph["space"] == {"train"}  # the spaces and their defaults: configs, no CLI
    assert "search" in graph["study"] and "study" not in set().union(*graph.values())
    assert "no import cycle" in capsys.readouterr().out


def test_a_cycle_through_an_import_inside_a_function_is_found(tmp_path, capsys):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("import os\n\ndef late():\n    from pkg.c import x\n")
    (package / "c.py").write_text("def f():\n    import pkg.a\n")
    assert import_graph.main([str(package)]) == 1
    assert "import cycle: a -> b -> c -> a" in capsys.readouterr().err
