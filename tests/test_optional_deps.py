"""Without nibabel and pynrrd (optional at run time: the GPU image lacks them) the caml package imports,
the readers that need them say which package to install, and the test suite collects (the tests that
need them skip)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCKER = '''
import sys

class _Blocked:  # nibabel and nrrd are not installed, as far as this process can tell
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("nibabel", "nrrd"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _Blocked())
'''


def _run(tmp_path, *args, timeout=300):
    shim = tmp_path / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), str(ROOT)]), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *args], env=env, cwd=str(ROOT), capture_output=True, text=True,
                          timeout=timeout)


def test_caml_imports_and_readers_name_the_missing_package(tmp_path):
    for case in ("CASE00", "CASE01"):
        (tmp_path / "raw" / case).mkdir(parents=True)
        (tmp_path / "raw" / case / "lgemri.nrrd").write_bytes(b"NRRD0004\n")
    (tmp_path / "x.nii.gz").write_bytes(b"\x1f\x8b")
    code = (f"import importlib.util, caml, caml.train, caml.evaluate, caml.data, caml.data.prepare_la\n"
            f"assert importlib.util.find_spec('caml') is not None\n"
            f"from caml.data.msd import read_nifti\n"
            f"try:\n    read_nifti({str(tmp_path / 'x.nii.gz')!r})\nexcept RuntimeError as err:\n    print(err)\n")
    done = _run(tmp_path, "-c", code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pip install nibabel" in done.stdout
    done = _run(tmp_path, "-m", "caml.data.prepare_la", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "o"))
    err = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(err) == 1 and "pip install pynrrd" in err[0], err


def test_the_suite_collects_without_nibabel_and_nrrd(tmp_path):
    done = _run(tmp_path, "-m", "pytest", "tests", "--collect-only", "-q", "-p", "no:cacheprovider")
    summary = done.stdout.strip().splitlines()[-1]  # "N tests collected in ...", with "M errors" if any
    assert done.returncode == 0 and "error" not in summary, (done.stdout + done.stderr)[-3000:]
    for test in ("test_evaluate.py::test_cli_module_exit_status", "test_nifti.py::test_seeded_split"):
        assert f"tests/{test}" in done.stdout  # collected (they run without nibabel)
