"""The seam: backend choice, forced backends, and no `detectron2` import anywhere else."""
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _import_with(backend):
    env = dict(os.environ, SAMANTICS_D2_BACKEND=backend)
    code = "import samantics_d2.d2 as d2; print(d2.BACKEND, d2.COCOEvaluator.__module__)"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)


def test_lite_backend_is_used_when_forced():
    proc = _import_with("lite")
    assert proc.returncode == 0, proc.stderr
    backend, module = proc.stdout.split()
    assert backend == "lite" and module.startswith("samantics_d2.lite")


def test_forcing_detectron2_without_it_fails_clearly():
    try:
        import detectron2  # noqa: F401
    except ImportError:
        proc = _import_with("detectron2")
        assert proc.returncode != 0
        assert "Detectron2 cannot be imported" in proc.stderr and "SAMANTICS_D2_BACKEND" in proc.stderr
    else:  # with Detectron2 installed, forcing it must give Detectron2's objects
        proc = _import_with("detectron2")
        assert proc.stdout.split()[1].startswith("detectron2")


def test_unknown_backend_value_is_rejected():
    proc = _import_with("detectorn2")
    assert proc.returncode != 0 and "'detectorn2' is not a backend" in proc.stderr


def test_only_the_seam_imports_detectron2():
    pattern = re.compile(r"^\s*(import detectron2|from detectron2)", re.M)
    offenders = []
    for path in list(ROOT.glob("samantics_d2/**/*.py")) + list(ROOT.glob("tools/*.py")) + list(
        ROOT.glob("configs/**/*.py")
    ) + [ROOT / "train_net.py"]:
        if path.name == "d2.py" and path.parent.name == "samantics_d2":
            continue
        if pattern.search(path.read_text()):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"files importing detectron2 outside the seam: {offenders}"


def test_every_seam_name_exists():
    import samantics_d2.d2 as d2

    missing = [name for name in d2.__all__ if not hasattr(d2, name)]
    assert not missing
