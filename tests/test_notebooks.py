"""The notebooks in notebooks/ run top to bottom (issue 11, part 4).

Each is executed with nbclient in a kernel of this interpreter, from notebooks/ as Jupyter would, with its
"parameters" cell replaced: the tiny `:runlocal` demo trained for a few steps in a temporary workdir, which the
tokenize notebook then restores (one training run for both). A cell that raises fails the test
(nbclient.exceptions.CellExecutionError); the tests also check what the notebooks produced.
"""
import copy
import json
import os
import pathlib

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
ipykernel_kernelspec = pytest.importorskip("ipykernel.kernelspec")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
KERNEL = "gaussiantoken_jax_test"
STEPS = 6  # :runlocal warms up for 5 steps; its checkpoint and evaluation come at the last step
BATCH = 8  # the notebooks encode 8 held-out crops
K = 16  # :runlocal's Gaussians per image


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory):
  """A kernelspec whose argv is this interpreter (not whatever "python3" the machine has), in a temp prefix."""
  prefix = tmp_path_factory.mktemp("jupyter")
  ipykernel_kernelspec.install(prefix=str(prefix), kernel_name=KERNEL)
  return KernelSpecManager(kernel_dirs=[str(prefix / "share" / "jupyter" / "kernels")])


def _kernel_env():
  """The test process's environment but one CPU device, as a user's machine has; the same compilation cache."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  env["JAX_PLATFORMS"] = "cpu"
  import jax  # pylint: disable=import-outside-toplevel  (conftest has configured the cache)
  env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  env.pop("MPLBACKEND", None)  # the kernel's inline backend
  return env


def run_notebook(name, kernel_specs, parameters):
  """Executes notebooks/<name> with its "parameters" cell replaced by `parameters`; returns the executed notebook."""
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  cells = [cell for cell in nb.cells if "parameters" in cell.metadata.get("tags", [])]
  assert len(cells) == 1, f"{name}: expected one cell tagged 'parameters', found {len(cells)}"
  cells[0].source = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
  km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=kernel_specs)
  client = nbclient.NotebookClient(nb, km=km, timeout=600, kernel_name=KERNEL,
                                   resources={"metadata": {"path": str(NOTEBOOKS)}})
  client.execute(env=_kernel_env())
  return nb


def _outputs(nb, output_type=None):
  return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
          if output_type is None or out.output_type == output_type]


def _text(nb):
  return "".join(out.get("text", "") for out in _outputs(nb, "stream") if out.get("name") == "stdout")


@pytest.fixture(scope="module")
def quickstart(kernel_specs, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("quickstart") / "workdir"
  nb = run_notebook("quickstart.ipynb", kernel_specs, dict(TOTAL_STEPS=STEPS, CONFIG_VARIANT="runlocal",
                                                          WORKDIR=str(workdir), REPO_URL="unused"))
  return nb, workdir


def test_notebooks_are_stored_without_outputs():
  for path in sorted(NOTEBOOKS.glob("*.ipynb")):
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
      if cell["cell_type"] == "code":
        assert cell["outputs"] == [] and cell["execution_count"] is None, f"{path.name} has outputs: strip them"


def test_quickstart_trains_and_draws(quickstart):
  nb, workdir = quickstart
  assert (workdir / "checkpoints" / str(STEPS)).is_dir(), sorted(p.name for p in (workdir / "checkpoints").iterdir())
  images = [out for out in _outputs(nb, "display_data") if "image/png" in out.data]
  assert len(images) == 3, "expected the reconstructions, the Gaussians and the codebook usage"
  text = _text(nb)
  assert f"step {STEPS}: PSNR" in text and "codes used" in text, text


def test_tokenize_restores_edits_and_decodes(quickstart, kernel_specs, tmp_path):
  _, workdir = quickstart
  tokens_path = tmp_path / "tokens.npz"
  nb = run_notebook("tokenize.ipynb", kernel_specs, dict(WORKDIR=str(workdir), TRAIN_STEPS_IF_MISSING=STEPS,
                                                         CONFIG_VARIANT="runlocal", TOKENS_PATH=str(tokens_path),
                                                         REPO_URL="unused"))
  text = _text(nb)
  assert "No checkpoint in" not in text, "it should have restored the quickstart's checkpoint"
  assert f"step {STEPS}, {K} tokens per 32x32 image" in text, text
  with np.load(tokens_path) as tokens:
    assert tokens["indices"].shape == (BATCH, K) and tokens["indices"].dtype == np.int32
    assert tokens["means"].shape == (BATCH, K, 2) and tokens["rotations"].shape == (BATCH, K)
    assert tokens["scales"].shape == (BATCH, K, 2)
  changes = {line.split()[0]: float(line.split(":")[1].split("/")[0]) for line in text.splitlines()
             if "mean absolute change" in line}
  assert changes["decoded"] == 0.0 and changes["moved"] > 0 and changes["rescaled"] > 0, changes
  assert len([out for out in _outputs(nb, "display_data") if "image/png" in out.data]) == 2


def test_broken_cell_fails(kernel_specs, monkeypatch):
  """nbclient raises when a cell fails, so a notebook broken by a library change fails these tests."""
  nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
                                       nbformat.v4.new_code_cell("raise ValueError('broken')")])
  monkeypatch.setattr(nbformat, "read", lambda *args, **kwargs: copy.deepcopy(nb))
  with pytest.raises(nbclient.exceptions.CellExecutionError, match="broken"):
    run_notebook("broken.ipynb", kernel_specs, dict(x=2))
