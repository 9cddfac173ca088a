"""The package's shape (issue 24): jobs at the top and never importing each other, the library never importing a
job, a small package root and short modules. Read from the source (the import statements), nothing is executed."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "oms_lightning"
JOBS = ("train", "sample", "search", "optimize_steps", "fit_coefficients", "cluster_stages", "report")
MAX_ROOT_MODULES = 10      # besides __init__.py and the subpackages
MAX_LINES = 460


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement of this file names (absolute, relative imports resolved), with the
    `from X import name` form also counted as X.name (which may be a submodule)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_jobs_never_import_another_job():
    for job in JOBS:
        imports = imported_modules(PACKAGE / "jobs" / f"{job}.py")
        others = {f"oms_lightning.jobs.{j}" for j in JOBS if j != job}
        assert not imports & others, f"jobs/{job}.py imports {sorted(imports & others)}"


def test_the_library_never_imports_a_job():
    for path in PACKAGE.rglob("*.py"):
        if "jobs" in path.relative_to(PACKAGE).parts:
            continue
        jobs = {m for m in imported_modules(path) if m == "oms_lightning.jobs" or m.startswith("oms_lightning.jobs.")}
        assert not jobs, f"{path.relative_to(PACKAGE)} imports the job(s) {sorted(jobs)}"


def test_the_import_walk_sees_imports_of_every_form():
    """The checks above can fail: absolute, `from … import module` and relative imports are all seen."""
    fake = PACKAGE / "jobs" / "sample.py"
    assert "oms_lightning.jobs.common" in imported_modules(fake)
    assert "oms_lightning.diffusion.solvers" in imported_modules(PACKAGE / "diffusion" / "iia.py")


def test_the_package_root_is_small_and_modules_are_short():
    root = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(root) <= MAX_ROOT_MODULES, f"{len(root)} modules at the package root: {root}"
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
