"""The layout a paper reader relies on: the five paper files at the top, the machinery behind them
in one package, imports one way (no cycle; the package never reaches back into train.py or
data.py), and model.py and loss.py standing alone."""
import ast
import os

from conftest import ROOT

PAPER = {"model", "loss", "data", "train", "eval"}


def project_imports(path):
    """The project modules a file imports at its top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in PAPER or n.startswith("machinery.")}
    return found


def modules():
    """{module name: the project modules it imports} for the paper files and the package."""
    graph = {name: project_imports(ROOT / f"{name}.py") for name in PAPER}
    for file in os.listdir(ROOT / "machinery"):
        if file.endswith(".py") and file != "__init__.py":
            graph[f"machinery.{file[:-3]}"] = project_imports(ROOT / "machinery" / file)
    return {name: {d for d in deps if d in graph or d in PAPER} for name, deps in graph.items()}


def test_the_top_level_holds_the_five_paper_files_and_one_package():
    python = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    assert python == PAPER
    assert (ROOT / "machinery" / "__init__.py").exists()


def test_model_and_loss_import_nothing_of_the_project():
    graph = modules()
    assert graph["model"] == set() and graph["loss"] == set()


def test_the_package_never_imports_train_or_data_and_eval_only_for_the_report():
    for name, deps in modules().items():
        if name.startswith("machinery."):
            assert not deps & {"train", "data"}, name
            assert "eval" not in deps or name == "machinery.report", name


def test_imports_go_one_way():
    graph = modules()
    done, active = set(), []

    def visit(name):
        assert name not in active, " -> ".join(active + [name])  # a cycle
        if name in done:
            return
        active.append(name)
        for dep in graph.get(name, ()):
            visit(dep)
        active.pop()
        done.add(name)

    for name in graph:
        visit(name)
