"""The package installs (editable and as a wheel) with every subpackage, and its layers hold:
importing the passes loads neither the exporter nor onnxruntime nor onnxscript."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import importlib, importlib.util, sys, graphopt, graphopt.passes.dce, graphopt.export, graphopt.passes
assert graphopt.__file__.startswith(sys.argv[1]), graphopt.__file__
assert graphopt.passes.dce.__file__.startswith(sys.argv[1])
assert importlib.util.find_spec("passes") is None and importlib.util.find_spec("export") is None
assert {"dce", "dedup", "sdpa"} <= set(graphopt.registered_passes())
# every module of the package imports from where it was installed: a subpackage left
# out of pyproject's list would only fail here (the editable install maps the folder)
import pkgutil
for info in pkgutil.walk_packages(graphopt.__path__, "graphopt."):
    module = importlib.import_module(info.name)
    assert module.__file__.startswith(sys.argv[1]), module.__file__
print("ok")
"""


def check_in_subprocess(location: Path, cwd: Path, env: dict | None = None) -> None:
    # a fresh interpreter outside the repo, so the working directory cannot make
    # ``passes`` importable by accident
    run = subprocess.run([sys.executable, "-c", CHECK, str(location)], check=False, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok"


def test_editable_install_imports_the_namespaced_packages(tmp_path):
    import graphopt.passes

    assert Path(graphopt.passes.__file__).parent == ROOT / "graphopt" / "passes"
    check_in_subprocess(ROOT, tmp_path)


def test_wheel_installs_and_imports(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir)],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheel_dir.glob("graphopt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "graphopt/passes/dce.py" in names and "graphopt/export/onnx_export.py" in names
    assert "graphopt/recipes/default.toml" in names
    packaged = {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")}
    on_disk = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "graphopt").rglob("__init__.py")}
    assert on_disk <= packaged, f"subpackages missing from the wheel: {sorted(on_disk - packaged)}"
    assert not any(n.startswith(("passes/", "export/", "tests/")) for n in names)

    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr
    check_in_subprocess(target, tmp_path, env=dict(os.environ, PYTHONPATH=str(target)))


LAYERS = """
import sys
import graphopt.passes, graphopt.quant, graphopt.attention, graphopt.cluster, graphopt.analysis
loaded = sorted(m for m in ("onnxruntime", "onnxscript", "graphopt.export") if m in sys.modules)
assert not loaded, loaded
print("ok")
"""


def test_passes_and_ops_do_not_load_the_exporter_or_onnx_runtimes(tmp_path):
    run = subprocess.run([sys.executable, "-c", LAYERS], check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok"
