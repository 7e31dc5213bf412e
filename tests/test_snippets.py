"""Every ```python block of README.md and docs/**/*.md runs as written, on tiny stand-ins for the files it names.

The rules a doc's author needs to know:

- **One block, one run.** Each block runs alone (blocks share nothing) in a fresh namespace, with a new,
  empty working directory that holds a copy of the repository's ``configs/``. A failure names the
  doc and the line of the block (the test id is ``doc:line``; the traceback points into the doc).
- **File names are not substituted.** Each string literal in the block that is a relative path (no
  ``..``) ending in a suffix of :data:`STAND_INS` is a file prepared at exactly that path before the
  block runs: ``.pt`` / ``.pth`` a random checkpoint with the full SSD300 layout at width 1/8 (300 px
  input, 8732 priors, the 20 VOC classes, BatchNorm everywhere), ``.onnx`` that checkpoint exported,
  ``.jpg`` / ``.jpeg`` / ``.png`` a 160x120 picture. A block that mentions ``data/shapes`` gets a small
  shapes dataset there (VOC layout, 8 train and 4 val images). Other files the block must make itself.
- **Placeholders.** Names in :data:`PLACEHOLDERS` stand for the reader's own data and are defined
  before the block runs (``rgb_array``, ``chw_tensor``); any other undefined name fails.
- **Skips**, always visible in the doc: a line ``# snippet: skip (reason)`` skips the block with that
  reason; ``# snippet: needs cuda`` skips it without a CUDA device; a block importing a module that is
  not installed (``onnxruntime`` without the ``onnx`` extra) is skipped naming the module.

Only ```python (or ```py) blocks run; bash, yaml and json blocks are not executed.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import shutil
import textwrap
import traceback
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("**/*.md"))]

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
PYTHON_INFO = {"python", "py", "python3"}
SKIP = re.compile(r"#\s*snippet:\s*skip\s*\((?P<reason>[^)]+)\)")
NEEDS_CUDA = re.compile(r"#\s*snippet:\s*needs cuda\b")
STAND_INS = (".pt", ".pth", ".onnx", ".jpg", ".jpeg", ".png")
PLACEHOLDERS = ("rgb_array", "chw_tensor")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line of the block's first code line, dedented code)`` for each Python fenced block of markdown ``text``."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence = m["fence"]
        close = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")  # CommonMark: as long, same char
        end = next((j for j in range(i + 1, len(lines)) if close.match(lines[j])), len(lines))
        if m["info"].split()[:1] and m["info"].split()[0].lower() in PYTHON_INFO:
            blocks.append((i + 2, textwrap.dedent("\n".join(lines[i + 1 : end]))))
        i = end + 1
    return blocks


def collect() -> list[tuple[str, int, str]]:
    return [(str(doc.relative_to(REPO)), line, code) for doc in DOCS for line, code in python_blocks(doc.read_text())]


BLOCKS = collect()


def imported_modules(code: str) -> list[str]:
    """The top-level modules a block imports (absolute imports only)."""
    names = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names += [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module.split(".")[0])
    return list(dict.fromkeys(names))


def skip_reason(code: str) -> str | None:
    if m := SKIP.search(code):
        return m["reason"].strip()
    if NEEDS_CUDA.search(code) and not torch.cuda.is_available():
        return "needs CUDA"
    missing = [name for name in imported_modules(code) if importlib.util.find_spec(name) is None]
    return f"needs {', '.join(missing)} (not installed)" if missing else None


def named_files(code: str) -> list[str]:
    """The string literals of a block that name a stand-in file (``"runs/x/best.pt"``, ``"street.jpg"``)."""
    literals = [n.value for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    relative = [s for s in literals if "\n" not in s and not Path(s).is_absolute() and ".." not in Path(s).parts]
    return list(dict.fromkeys(s for s in relative if s.lower().endswith(STAND_INS)))


class Stock:
    """The stand-in files, each made once per session on first use and copied to where a block names it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.made: dict[str, Path] = {}

    def place(self, name: str, cwd: Path) -> None:
        dst = cwd / name
        if dst.exists():
            return
        suffix = Path(name).suffix.lower()
        if suffix not in self.made:
            self.made[suffix] = getattr(self, f"make_{suffix.lstrip('.')}")()
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.made[suffix], dst)

    def make_pt(self) -> Path:
        from ssd.checkpoint import make_checkpoint, save_checkpoint
        from ssd.classes import VOC_CLASSES
        from ssd.config import ModelConfig, from_dict
        from ssd.model import build_ssd

        cfg = from_dict(ModelConfig, {"width": 0.125, "num_classes": 21, "batch_norm": "all"}, "model")
        torch.manual_seed(0)
        path = self.root / "ssd300_tiny.pt"
        save_checkpoint(make_checkpoint(build_ssd(cfg).state_dict(), cfg, list(VOC_CLASSES), "train"), path)
        return path

    make_pth = make_pt

    def make_onnx(self) -> Path:
        if importlib.util.find_spec("onnx") is None:
            pytest.skip("making the .onnx stand-in needs onnx (not installed)")
        from ssd.cli import main

        path = self.root / "ssd300_tiny.onnx"  # as ssd export writes it: with the metadata Detector reads
        assert main(["export", "--weights", str(self.made.get(".pt") or self.make_pt()), "--out", str(path)]) == 0
        return path

    def make_image(self, suffix: str) -> Path:
        rgb = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
        path = self.root / f"picture{suffix}"
        assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        return path

    def make_jpg(self) -> Path:
        return self.make_image(".jpg")

    def make_jpeg(self) -> Path:
        return self.make_image(".jpeg")

    def make_png(self) -> Path:
        return self.make_image(".png")


def placeholders() -> dict[str, object]:
    """The reader's own data in the docs: an HxWx3 uint8 RGB array, a 3xHxW uint8 tensor."""
    rng = np.random.default_rng(1)
    values = {
        "rgb_array": rng.integers(0, 256, (90, 120, 3), dtype=np.uint8),
        "chw_tensor": torch.from_numpy(rng.integers(0, 256, (3, 100, 140), dtype=np.uint8)),
    }
    assert tuple(values) == PLACEHOLDERS
    return values


@pytest.fixture(scope="module")
def stock(tmp_path_factory) -> Stock:
    return Stock(tmp_path_factory.mktemp("stock"))


@pytest.mark.parametrize("doc, line, code", BLOCKS, ids=[f"{doc}:{line}" for doc, line, _ in BLOCKS])
def test_snippet_runs_as_written(doc, line, code, stock, tmp_path, monkeypatch):
    if reason := skip_reason(code):
        pytest.skip(f"{doc}:{line}: {reason}")
    shutil.copytree(REPO / "configs", tmp_path / "configs")  # a copy: a block may write next to them
    for name in named_files(code):
        stock.place(name, tmp_path)
    if "data/shapes" in code:
        from ssd.data.shapes import generate_shapes

        generate_shapes(tmp_path / "data" / "shapes", 8, 4, size=128, seed=0)
    monkeypatch.chdir(tmp_path)
    program = compile("\n" * (line - 1) + code, str(REPO / doc), "exec")  # line numbers are the doc's
    try:
        exec(program, {"__name__": "__main__", **placeholders()})
    except Exception as e:  # Python's own traceback: short, and its frames in the doc show the doc's line
        in_doc = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == str(REPO / doc)]
        failure = f"{doc}:{in_doc[-1] if in_doc else line}: {type(e).__name__}: {e}\n\n" + "".join(
            traceback.format_exception(e)
        )
    else:
        return
    pytest.fail(failure, pytrace=False)


# --- the rules themselves ------------------------------------------------------------------------

MARKDOWN = """\
# Title

```bash
ssd train x.yaml
```

```python
det = Detector.from_checkpoint("runs/x/best.pt")
```

- a list item:

  ~~~py
  import onnxruntime_not_installed_here
  x = "a.jpg"  # snippet: needs cuda
  ~~~

````python skip-me-not
# snippet: skip (needs a 24 GB GPU)
```
````
"""


def test_blocks_are_found_with_their_doc_lines():
    blocks = python_blocks(MARKDOWN)
    assert [line for line, _ in blocks] == [8, 14, 19]
    assert blocks[0][1] == 'det = Detector.from_checkpoint("runs/x/best.pt")'
    assert blocks[1][1].startswith("import onnxruntime_not_installed_here\n")  # the list's indent removed
    assert blocks[2][1] == "# snippet: skip (needs a 24 GB GPU)\n```"  # a longer fence holds a shorter one
    assert named_files(blocks[0][1]) == ["runs/x/best.pt"] and named_files(blocks[1][1]) == ["a.jpg"]
    assert named_files('f("/abs/a.pt", "../up.jpg", "b.PNG", "b.PNG")') == ["b.PNG"]


def test_skip_rules():
    blocks = [code for _, code in python_blocks(MARKDOWN)]
    assert skip_reason(blocks[0]) is None
    expected = "needs CUDA" if not torch.cuda.is_available() else "needs onnxruntime_not_installed_here (not installed)"
    assert skip_reason(blocks[1]) == expected
    assert skip_reason(blocks[2]) == "needs a 24 GB GPU"


def test_every_doc_with_python_blocks_is_collected():
    docs = {doc for doc, _, _ in BLOCKS}
    assert {"README.md", "docs/inference.md"} <= docs
    assert all(code.strip() for _, _, code in BLOCKS)
