"""The notebooks in notebooks/ run end to end on CPU with a tiny Gemma-2 model.

Each notebook is executed with nbclient (kernel `python3`); its parameters are injected by inserting a
cell tagged `injected-parameters` right after the cell tagged `parameters`, as papermill does.
Notebook 01 trains the run once (module fixture); 02, 03 and 05 read it. Notebook 04 trains a set on a tiny Gemma-3
and needs circuit-tracer's venv (see tests/test_circuit_tracer.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import ipykernel  # noqa: F401  (the kernel nbclient starts; part of the dev extra, never skipped)
import nbclient
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
TRAIN, MONITOR, INSPECT, ATTRIBUTION, HIERARCHY = (NOTEBOOKS / name for name in (
    "01_train_matryoshka_transcoder.ipynb", "02_monitor_fvu.ipynb", "03_inspect_activation_samples.ipynb",
    "04_attribution_graph.ipynb", "05_matryoshka_hierarchy.ipynb"))
CELL_TIMEOUT = 300


def kernel_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="module://matplotlib_inline.backend_inline")
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def inject(nb, values: dict) -> None:
    """Insert an `injected-parameters` cell after the `parameters` cell."""
    index = next(i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, cell)


def execute(path: Path, values: dict, out: Path, check: str | None = None):
    """Run the notebook with `values` injected (and `check`, code appended as a last cell); writes the
    executed copy to `out` and returns it. Any cell error raises nbclient's CellExecutionError."""
    nb = nbformat.read(path, as_version=4)
    inject(nb, values)
    if check:
        nb.cells.append(nbformat.v4.new_code_cell(check))
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    try:
        client.execute(env=kernel_env())
    finally:
        out.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out)
    return nb


def outputs(nb, mime: str) -> list[str]:
    found = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if mime in data:
                value = data[mime]
                found.append("".join(value) if isinstance(value, list) else value)
    return found


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Notebook 01 run once on a tiny Gemma-2: (run dir, tmp root, executed notebook)."""
    from mtc.testing import tiny_model

    root = tmp_path_factory.mktemp("notebooks")
    tiny = tiny_model(root / "tiny", "gemma2")
    run_dir = root / "runs" / "tiny-l1"
    values = dict(MODEL=str(tiny), LAYER=1, PRESET=None, RUN_DIR=str(run_dir), D_SAE=128, K=4, BATCH_SIZE=64,
                  TOTAL_TOKENS=64 * 60, WARMUP_STEPS=5, SEQ_LEN=32, BUFFER_TOKENS=1024, MODEL_BATCH_SIZE=8,
                  LOG_EVERY=10, CHECKPOINT_EVERY=10, DATASET="pydoc", DRIVE_DIR="none", WANDB_MODE="disabled",
                  PROGRESS=False)
    nb = execute(TRAIN, values, root / "executed" / TRAIN.name)
    return run_dir, root, nb


@pytest.mark.slow
def test_train_notebook_writes_a_final_checkpoint(trained):
    run_dir, _, nb = trained
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert (run_dir / "samples" / "index.json").is_file()
    text = "".join(o.get("text", "") for cell in nb.cells for o in cell.get("outputs", []) if o.get("name") == "stdout")
    assert "prefixes [8, 24, 56, 128]" in text
    assert "not in Colab" in text  # the Colab-only steps skipped themselves
    assert "memory plan on CPU RAM" in text and "layers by pass: 0-2" in text  # the set's plan, nothing trained
    assert not (run_dir.parent / "tiny-l1-set").exists()


@pytest.mark.slow
def test_monitor_notebook_plots_training_and_the_matryoshka_curve(trained):
    run_dir, root, _ = trained
    baseline = root / "runs" / "baseline"
    if not baseline.exists():
        shutil.copytree(run_dir, baseline, ignore=shutil.ignore_patterns("eval.*", "*.png"))
    nb = execute(MONITOR, dict(RUN_DIR=str(run_dir), BASELINE_RUN_DIR=str(baseline), LIVE=False,
                               EVAL_TOKENS=256, EVAL_BATCH_SIZE=4),
                 root / "executed" / MONITOR.name)
    assert (run_dir / "fvu.png").stat().st_size > 0
    assert (run_dir / "matryoshka_curve.png").stat().st_size > 0
    assert (run_dir / "eval.json").is_file() and (baseline / "eval.json").is_file()
    assert len(outputs(nb, "image/png")) >= 2


@pytest.mark.slow
def test_hierarchy_notebook_compares_plain_and_matryoshka(trained):
    import mtc

    run_dir, root, _ = trained
    plain_dir = root / "runs" / "plain"
    if not plain_dir.exists():  # the same weights read as one prefix: the plain path (frequency pseudo-groups)
        model = mtc.load(run_dir / "final")
        model.cfg = model.cfg.replace(prefix_sizes=[model.cfg.d_sae], prefix_weights=None)
        mtc.save(model, plain_dir / "final")
    out = root / "hierarchy"
    nb = execute(HIERARCHY, dict(MATRYOSHKA_RUN=str(run_dir), PLAIN_RUN=str(plain_dir), EVAL_TOKENS=256,
                                 ABSORPTION_WORDS=150, MIN_LETTERS=1, OUT_DIR=str(out), TOY_SEEDS=[0],
                                 TOY_TOKENS=1024 * 60),
                 root / "executed" / HIERARCHY.name)
    text = "".join(o.get("text", "") for cell in nb.cells for o in cell.get("outputs", []) if o.get("name") == "stdout")
    assert "Matryoshka's absorption is" in text and "absorption" in text
    compare = json.loads((out / "compare.json").read_text())
    assert set(compare) == {run_dir.name, "plain"}
    assert compare["plain"]["absorption"]["pseudo_groups"] and not compare[run_dir.name]["absorption"]["pseudo_groups"]
    assert compare[run_dir.name]["absorption"]["projection"] == "source_decoder"
    assert len(outputs(nb, "image/png")) >= 3  # toy bars, the hierarchy plot, the absorption panels


# Drives the browser's widgets from the kernel: a similar-latent button jumps, a group narrows the slider.
WIDGET_CHECK = """
target = similar_latents(slider.value, N_SIMILAR)[0][0]
similar_box.children[1].click()
assert slider.value == box.value == target, (slider.value, box.value, target)
lo, hi = groups[1][1]
group_picker.value = (lo, hi)
assert (slider.min, slider.max) == (lo, hi) and lo <= slider.value <= hi
jump(SAMPLES.d_sae - 1)
assert slider.value == SAMPLES.d_sae - 1 and group_picker.value == groups[0][1]
print("widgets ok")
"""


@pytest.mark.slow
def test_inspect_notebook_renders_the_peak_token(trained):
    run_dir, root, _ = trained
    nb = execute(INSPECT, dict(RUN_DIR=str(run_dir), LATENT=None), root / "executed" / INSPECT.name,
                 check=WIDGET_CHECK)
    rendered = "".join(outputs(nb, "text/html"))
    peaks = re.findall(r"<mark[^>]*>(.*?)</mark>", rendered, flags=re.S)
    assert peaks, "no highlighted peak token in the rendered HTML"
    assert all(peak for peak in peaks)
    last = nb.cells[-1].outputs
    assert "widgets ok" in "".join(o.get("text", "") for o in last)
    assert not any(o.output_type == "error" or "Traceback" in o.get("text", "") for o in last)  # callback errors


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_committed_notebooks_have_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert any("parameters" in cell.metadata.get("tags", []) for cell in nb.cells)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs"


@pytest.mark.slow
def test_attribution_notebook_compares_two_prefixes_of_a_set_and_a_clt(tmp_path):
    from mtc.attribution import circuit_tracer_python
    from mtc.testing import tiny_model

    try:
        python = circuit_tracer_python()
    except FileNotFoundError as err:
        if os.environ.get("MTC_REQUIRE_CIRCUIT_TRACER") == "1":
            pytest.fail(str(err))
        pytest.skip(str(err))
    tiny = tiny_model(tmp_path / "tiny-gemma3", "gemma3", n_layers=3)
    train = ["--d-sae", "128", "--prefix-sizes", "32", "128", "--k", "8", "--k-aux", "32", "--batch-size", "64",
             "--total-tokens", str(64 * 30), "--warmup-steps", "3", "--seq-len", "32", "--buffer-tokens", "1024",
             "--model-batch-size", "8", "--dataset", "pydoc", "--drive-dir", "none", "--wandb-mode", "disabled",
             "--samples-every", "0", "--no-progress"]
    values = dict(MODEL=str(tiny), SET_DIR=str(tmp_path / "runs" / "set"), CLT_DIR=str(tmp_path / "runs" / "set-clt"),
                  TRAIN_ARGS=train, PREFIXES=[None, 1], CT_PYTHON=python, INSTALL_VENV=False, MAX_FEATURE_NODES=200,
                  REPLACEMENT_TOKENS=256)
    nb = execute(ATTRIBUTION, values, tmp_path / "executed" / ATTRIBUTION.name)
    table = "".join(outputs(nb, "text/markdown"))
    assert "| | set, full | set, prefix 1 | CLT, full | CLT, prefix 1 |" in table
    assert "| replacement score |" in table and "| completeness score |" in table
    assert "| set | 1 |" in table and "| CLT | 2 |" in table  # every MLP replaced at once, per prefix
    text = "".join(o.get("text", "") for cell in nb.cells for o in cell.get("outputs", []) if o.get("name") == "stdout")
    assert text.count("same active features: True") == 4
    assert len(outputs(nb, "image/png")) == 1
    assert (tmp_path / "runs" / "set-circuit-tracer-p1-graph" / "graph.pt").is_file()
    assert (tmp_path / "runs" / "set-clt-circuit-tracer-p1-graph" / "graph.pt").is_file()


def test_all_five_notebooks_exist():
    assert all(p.is_file() for p in (TRAIN, MONITOR, INSPECT, ATTRIBUTION, HIERARCHY))
