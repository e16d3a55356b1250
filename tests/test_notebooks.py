"""Every notebook under notebooks/ runs top to bottom, and the committed copies hold no outputs.

The notebooks run in a Jupyter kernel started from this interpreter (a kernelspec written to a
temporary folder names `sys.executable`, so the kernel sees the same packages as pytest), with
matplotlib's non-interactive Agg backend and the repository on the kernel's PYTHONPATH. A failing
cell fails its notebook's test with that cell's source and traceback. The default suite runs them
in their smoke setting (FEDJAX_LAB_SMOKE=1: a few rounds, every cell); `pytest -m slow` runs them
in full, as a reader does.

Notebooks are committed with outputs stripped, so that diffs show code and prose only. Strip them
with this file's command line, which uses nbformat only:

    python tests/test_notebooks.py notebooks/*.ipynb
"""

import json
import os
import pathlib
import re
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL_NAME = "fedjax-lab-pytest"
# A cell that runs longer than this is reported as hung rather than waited on.
CELL_TIMEOUT_S = 300
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def strip_outputs(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Removes every code cell's outputs, execution count and execution timing, in place."""
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
            cell.metadata.pop("execution", None)
    return notebook


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> pathlib.Path:
    """A kernels/ folder holding one kernelspec that starts this very interpreter."""
    kernels = tmp_path_factory.mktemp("jupyter") / "kernels"
    spec_dir = kernels / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"fedjax_lab tests ({sys.executable})", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return kernels


def test_notebooks_exist():
    names = [path.name for path in NOTEBOOKS]
    assert "01_quickstart.ipynb" in names and "05_write_your_own.ipynb" in names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_is_stripped(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    dirty = [index for index, cell in enumerate(notebook.cells) if cell.cell_type == "code"
             and (cell.outputs or cell.execution_count is not None
                  or "execution" in cell.metadata)]
    assert not dirty, (f"{path.name}: code cells {dirty} hold outputs or execution counts; strip "
                       f"them with `python tests/test_notebooks.py notebooks/{path.name}`")


@pytest.mark.parametrize("smoke", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["smoke", "full"])
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs(path, smoke, kernel_dir):
    notebook = nbformat.read(path, as_version=4)
    # The kernel must be this interpreter; checked in the kernel itself after the last cell.
    notebook.cells.append(nbformat.v4.new_code_cell(
        f"import sys\nassert sys.executable == {sys.executable!r}, sys.executable"))
    manager = KernelManager(kernel_name=KERNEL_NAME,
                            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]))
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": pythonpath,
           "FEDJAX_LAB_SMOKE": "1" if smoke else "0"}
    client = NotebookClient(notebook, km=manager, timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    try:
        client.execute(env=env)
    except CellExecutionError as error:
        pytest.fail(f"{path.name} failed:\n{_ANSI.sub('', str(error))}", pytrace=False)


def main(paths: list[str]) -> int:
    """Strips the outputs of the notebooks named on the command line, in place."""
    if not paths:
        print("usage: python tests/test_notebooks.py NOTEBOOK.ipynb ...", file=sys.stderr)
        return 2
    for path in paths:
        notebook = strip_outputs(nbformat.read(path, as_version=4))
        nbformat.validate(notebook)
        temporary = f"{path}.tmp"
        nbformat.write(notebook, temporary)
        os.replace(temporary, path)
        print(f"stripped {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
