"""The code the documentation shows is code that runs.

- Tutorials include files of ``examples/`` with ``--8<-- "examples/<file>.py:<section>"``;
  every such reference must name an existing file and section, and the subclassing tutorial's
  module is run here.
- A code block titled with an example's path (```` ```python title="examples/x.py" ````) is an
  excerpt of that file, so it must appear in it verbatim (up to indentation).
- A code block right after a ``<!-- test: run -->`` line is executed.
"""

from __future__ import annotations

import importlib
import re
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import keras
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = ROOT / "examples"

SNIPPET = re.compile(r'^\s*--8<--\s+"([^":]+)(?::([\w-]+))?"\s*$', re.MULTILINE)
FENCE = re.compile(
    r"^(?P<indent> *)```(?P<info>[^\n]*)\n(?P<body>.*?)^(?P=indent)```\s*$", re.M | re.S
)
TITLE = re.compile(r'title="([^"]+)"')
RUN_MARKER = "<!-- test: run -->"


def doc_pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def snippet_references() -> list[tuple[str, str, str | None]]:
    return [
        (page.name, path, section or None)
        for page in doc_pages()
        for path, section in SNIPPET.findall(page.read_text())
    ]


def titled_excerpts() -> list[tuple[str, str, str]]:
    found = []
    for page in doc_pages():
        for fence in FENCE.finditer(page.read_text()):
            title = TITLE.search(fence["info"])
            if title and title.group(1).startswith("examples/"):
                found.append((page.name, title.group(1), fence["body"]))
    return found


def runnable_blocks() -> list[Any]:
    blocks = []
    for page in doc_pages():
        text = page.read_text()
        for index, fence in enumerate(FENCE.finditer(text)):
            before = text[: fence.start()].rstrip().splitlines()
            if before and before[-1].strip() == RUN_MARKER:
                blocks.append(pytest.param(page.name, fence["body"], id=f"{page.stem}-{index}"))
    return blocks


def test_the_docs_have_snippets_excerpts_and_runnable_blocks() -> None:
    # Guards the tests below against passing vacuously after a change to the markup.
    assert len(snippet_references()) >= 8
    assert len(titled_excerpts()) >= 8
    assert len(runnable_blocks()) >= 2


@pytest.mark.parametrize(("page", "path", "section"), snippet_references())
def test_included_snippets_exist(page: str, path: str, section: str | None) -> None:
    file = ROOT / path
    assert file.is_file(), f"{page} includes {path}, which does not exist"
    if section is not None:
        text = file.read_text()
        start, end = f"# --8<-- [start:{section}]", f"# --8<-- [end:{section}]"
        assert start in text and end in text, f"{page}: {path} has no section {section!r}"
        assert text.index(start) < text.index(end)


@pytest.mark.parametrize(("page", "path", "body"), titled_excerpts())
def test_titled_code_blocks_are_excerpts_of_their_file(page: str, path: str, body: str) -> None:
    excerpt = textwrap.dedent(body).strip("\n").splitlines()
    lines = (ROOT / path).read_text().splitlines()
    windows = (
        textwrap.dedent("\n".join(lines[i : i + len(excerpt)])).splitlines()
        for i in range(len(lines) - len(excerpt) + 1)
    )
    assert any(window == excerpt for window in windows), (
        f"a code block of {page} titled {path} is not in that file; update the page:\n"
        + "\n".join(excerpt)
    )


@pytest.fixture
def float32_policy() -> Any:
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.slow
@pytest.mark.parametrize(("page", "code"), runnable_blocks())
def test_runnable_blocks_run(
    page: str, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, float32_policy: Any
) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": f"docs_{Path(page).stem.replace('-', '_')}"}
    if "tensorflow_datasets" in code:
        tfds = pytest.importorskip("tensorflow_datasets")
        with tfds.testing.mock_data(num_examples=64):
            exec(compile(code, page, "exec"), namespace)
    else:
        exec(compile(code, page, "exec"), namespace)
    assert "trainer" in namespace


# ---------------------------------------------------------------- the subclassing tutorial


@pytest.fixture
def custom_training_steps(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module("custom_training_steps")


def test_subclassing_page_includes_the_tested_module() -> None:
    sections = {
        section
        for page, path, section in snippet_references()
        if page == "subclassing.md" and path == "examples/custom_training_steps.py"
    }
    assert {"lasso", "lasso-fit", "gan-model", "gan-trainer", "gan-fit"} <= sections


@pytest.mark.slow
def test_lasso_trainer_zeroes_the_irrelevant_weights_and_keeps_metrics(
    custom_training_steps: ModuleType,
) -> None:
    result = custom_training_steps.train_lasso(epochs=10, seed=1)
    weights, true_weights = result["weights"], custom_training_steps.TRUE_WEIGHTS
    irrelevant = true_weights == 0
    assert np.abs(weights[irrelevant]).max() < 0.03
    # The penalty shrinks the others a little, by about l1 / 2.
    np.testing.assert_allclose(weights[~irrelevant], true_weights[~irrelevant], atol=0.1)
    history = result["history"]
    assert len(history["mae"]) == 10  # update_metrics in the override kept the metric
    assert history["loss"][-1] < history["loss"][0]


@pytest.mark.slow
def test_gan_trainer_updates_both_networks_and_learns_the_distribution(
    custom_training_steps: ModuleType,
) -> None:
    result = custom_training_steps.train_gan(epochs=10, seed=1)
    updates = 10 * 4096 // 64
    assert result["generator_updates"] == updates
    assert result["discriminator_updates"] == updates
    samples = result["samples"]
    assert abs(samples.mean() - custom_training_steps.REAL_MEAN) < 0.3
    assert 0.1 < samples.std() < 2 * custom_training_steps.REAL_STDDEV
    history = result["history"]
    assert {"loss", "generator_loss", "generated_mean"} <= set(history)
    assert all(np.isfinite(history["generator_loss"]))
