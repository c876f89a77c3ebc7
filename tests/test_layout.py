"""The defenses' layout (issue 31): a method module — one that registers a defense — imports no
other method module. What several methods share lives in modules that register none
(defenses/base, recipe, sources, budget, pruning, mask_pruning, two_pass, unlearning) or under
neurons/."""

import ast
from pathlib import Path

import torchpurify
from torchpurify.defenses import DEFENSES

PACKAGE = Path(torchpurify.__file__).parent
# The registry's door: it imports every method module so that each registers its defense.
DOOR = "torchpurify.defenses"


def module_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources(folder: str) -> dict[str, tuple[ast.Module, bool]]:
    """``{module: (syntax tree, is a package)}`` for every module under ``folder``."""
    return {
        module_of(path): (ast.parse(path.read_text()), path.name == "__init__.py")
        for path in sorted((PACKAGE / folder).rglob("*.py"))
    }


def registers_defense(tree: ast.Module) -> bool:
    """Whether a class in ``tree`` is decorated with ``register_defense``."""
    return any(
        isinstance(node, ast.ClassDef)
        and any(
            (isinstance(d, ast.Name) and d.id == "register_defense")
            or (isinstance(d, ast.Attribute) and d.attr == "register_defense")
            for d in node.decorator_list
        )
        for node in ast.walk(tree)
    )


def imported(tree: ast.Module, module: str, package: bool = False) -> set[str]:
    """Every module ``tree`` (the source of ``module``) may import, anywhere in it: ``import a.b``
    gives a.b; ``from a import b`` gives a and a.b (b may be a module); relative imports are
    resolved against ``module``."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                anchor = parts if package else parts[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def method_modules() -> set[str]:
    return {name for name, (tree, _) in sources("defenses").items() if registers_defense(tree)}


def crossings(modules: dict[str, tuple[ast.Module, bool]], methods: set[str]) -> list[str]:
    """``"a imports b"`` for every module in ``modules`` importing a method module not its own."""
    return [
        f"{name} imports {target}"
        for name, (tree, package) in modules.items()
        if name != DOOR
        for target in sorted(imported(tree, name, package) & (methods - {name}))
    ]


def test_the_method_modules_are_those_of_the_registered_defenses():
    registered = {DEFENSES.get(name).__module__ for name in DEFENSES.names()}
    assert method_modules() == registered
    # The shared machinery registers nothing (pruning.py holds only the pruners' base class).
    shared = ["base", "recipe", "sources", "budget", "pruning", "mask_pruning", "two_pass"]
    assert not {f"torchpurify.defenses.{name}" for name in [*shared, "unlearning"]} & registered


def test_no_method_module_imports_another():
    modules = {**sources("defenses"), **sources("neurons")}
    assert crossings(modules, method_modules()) == []


def test_the_check_sees_every_form_of_import():
    methods = {"torchpurify.defenses.anp", "torchpurify.defenses.rnp"}
    forms = [
        "from torchpurify.defenses.anp import MaskPruning",
        "from torchpurify.defenses import anp",
        "import torchpurify.defenses.anp",
        "from .anp import MaskPruning",
        "from . import anp",
        "def later():\n    from torchpurify.defenses.anp import epochs_for",
    ]
    for source in forms:
        tree = ast.parse(source)
        found = crossings({"torchpurify.defenses.rnp": (tree, False)}, methods)
        assert found == ["torchpurify.defenses.rnp imports torchpurify.defenses.anp"], source
    # Shared modules, and a method module's own name, are not crossings.
    allowed = ast.parse(
        "from torchpurify.defenses.budget import largest_passing\nfrom . import rnp"
    )
    assert crossings({"torchpurify.defenses.rnp": (allowed, False)}, methods) == []
    # Relative imports resolve against a package's __init__ too.
    door = ast.parse("from . import anp")
    assert imported(door, "torchpurify.defenses", package=True) >= {"torchpurify.defenses.anp"}
