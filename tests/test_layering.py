"""The libraries the apps use, `networks/` and `pipelines/`, import nothing from the apps (`apphub_vit/`)."""
import ast

import pytest

from tests.conftest import REPO


def _imported_modules(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):  # imports inside functions count too
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module


@pytest.mark.parametrize("package", ["networks", "pipelines"])
def test_libraries_do_not_import_the_apps(package):
    files = sorted((REPO / package).glob("*.py"))
    assert files
    upward = {f"{path.name}: {name}" for path in files for name in _imported_modules(path)
              if name == "apphub_vit" or name.startswith("apphub_vit.")}
    assert not upward, f"{package}/ imports from apphub_vit/: {sorted(upward)}"
