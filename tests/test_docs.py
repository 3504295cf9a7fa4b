"""The documentation's examples are programs, and this runs them.

In README.md and docs/*.md: every ```cdsl block parses and its nets compile,
every ```cdsl-error block is rejected with a ConvDSLError, and per file, in
order, in a scratch directory (with a copy of examples/): every ```python block
runs (one namespace per file, like a notebook) and every ```sh block whose first
line starts with `convdsl ` runs through convdsl.cli.main.

Markers (docs/internals.md, "The documentation is tested"): an HTML comment on
the line(s) before a block, `<!-- doctest: skip -->` (a fragment or an
excerpt), `<!-- doctest: file=NAME -->` (also write this cdsl block to NAME),
`<!-- doctest: output -->` (this block is what the block before it prints),
`<!-- doctest: exit=N -->` (the commands exit with N), `<!-- doctest: slow -->`
(only with -m slow); and `# needs: gpu` as the first line of a python block
(skipped without CUDA).
"""
from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import convdsl
from convdsl.cli import main
from convdsl.ops import OPS

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

DIRECTIVE = re.compile(r"^<!--\s*doctest:\s*(.*?)\s*-->$")
FENCE = re.compile(r"^(\s*)```\s*([\w-]*)\s*$")
GPU_MARK = "# needs: gpu"


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    directives: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"

    @property
    def runnable(self) -> bool:
        if "skip" in self.directives:
            return False
        if self.lang == "python":
            return True
        return self.lang == "sh" and self.text.lstrip().startswith("convdsl ")


def _directives(text: str) -> dict:
    found = {}
    for word in text.split():
        key, _, value = word.partition("=")
        found[key] = value or True
    return found


def read_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, with the markers just above each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, pending, i = [], {}, 0
    while i < len(lines):
        stripped = lines[i].strip()
        directive = DIRECTIVE.match(stripped)
        fence = FENCE.match(lines[i])
        if directive:
            pending.update(_directives(directive.group(1)))
        elif fence:
            indent, lang = fence.groups()
            start, body = i + 1, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                line = lines[i]
                body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
                i += 1
            blocks.append(Block(path, start, lang, "\n".join(body) + "\n", pending))
            pending = {}
        elif stripped:
            pending = {}  # a marker applies to the block right below it
        i += 1
    return blocks


ALL_BLOCKS = [b for path in DOCS for b in read_blocks(path)]


# -- .cdsl snippets --------------------------------------------------------------------------

def cdsl_blocks():
    for block in ALL_BLOCKS:
        if block.lang in ("cdsl", "cdsl-error") and "skip" not in block.directives:
            yield pytest.param(block, id=block.where)


def _compile_all(text: str) -> None:
    program = convdsl.compiler.load_program(text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", convdsl.ConvDSLWarning)
        for name in program.nets:
            convdsl.compile(text, net=name, backend="torch")


@pytest.mark.parametrize("block", list(cdsl_blocks()))
def test_cdsl_snippet(block):
    if block.lang == "cdsl-error":
        with pytest.raises(convdsl.ConvDSLError):
            _compile_all(block.text)
    else:
        _compile_all(block.text)  # parses; complete nets compile


def test_docs_have_examples():
    nets = [b for b in ALL_BLOCKS if b.lang == "cdsl" and "net " in b.text]
    assert len(nets) >= 5
    assert any(b.lang == "python" and b.runnable for b in ALL_BLOCKS)
    assert any(b.lang == "sh" and b.runnable for b in ALL_BLOCKS)


def test_language_reference_has_an_example_per_op():
    reference = [b.text for b in read_blocks(ROOT / "docs" / "language.md")
                 if b.lang == "cdsl" and "skip" not in b.directives]
    code = "\n".join(reference)
    missing = [op for op in OPS.user_facing() if not re.search(rf"\b{op}\(", code)]
    assert missing == [], f"docs/language.md has no ```cdsl example calling {missing}"


def test_markers_are_understood():
    known = {"skip", "file", "output", "exit", "slow"}
    for block in ALL_BLOCKS:
        assert set(block.directives) <= known, f"{block.where}: unknown marker"
        if "output" in block.directives:
            assert block.lang in ("", "text", "console"), f"{block.where}: output block is text"


# -- running the Python and shell blocks of each file ----------------------------------------

def _files(slow: bool):
    for path in DOCS:
        blocks = read_blocks(path)
        if not any(b.runnable or "file" in b.directives for b in blocks):
            continue
        has_slow = any("slow" in b.directives for b in blocks)
        if slow and has_slow:
            yield pytest.param(path, id=path.name, marks=pytest.mark.slow)
        elif not slow:
            yield pytest.param(path, id=path.name)


def _commands(block: Block) -> list[list[str]]:
    text = block.text.replace("\\\n", " ")  # continued lines
    commands = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        argv = shlex.split(line, comments=True)
        assert argv[0] == "convdsl", f"{block.where}: a convdsl block runs only convdsl: {line}"
        commands.append(argv[1:])
    return commands


def _run_python(block: Block, namespace: dict) -> None:
    code = compile(block.text, f"{block.path.name} (block at line {block.line})", "exec")
    exec(code, namespace)  # noqa: S102 -- the documentation's own example, run as written


def _run_sh(block: Block) -> None:
    expected = int(block.directives.get("exit", 0))
    for argv in _commands(block):
        status = main(argv)
        assert status == expected, f"{block.where}: convdsl {shlex.join(argv)} exited {status}"


def _normalized(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


def run_file(path: Path, workdir: Path, include_slow: bool) -> dict:
    """Run the file's blocks in order; returns counts of what ran and was skipped."""
    shutil.copytree(ROOT / "examples", workdir / "examples")
    namespace = {"__name__": "__doc__"}
    counts = {"ran": 0, "skipped": 0, "outputs": 0}
    last_output, last_ran = "", False
    for block in read_blocks(path):
        if block.lang in ("cdsl", "cdsl-error") and "file" in block.directives:
            (workdir / block.directives["file"]).write_text(block.text, encoding="utf-8")
        if "output" in block.directives:
            if last_ran:
                assert _normalized(last_output) == _normalized(block.text), (
                    f"{block.where}: the documented output differs from what the block above "
                    f"printed:\n{last_output}")
                counts["outputs"] += 1
            continue
        if not block.runnable:
            continue
        skip = ("slow" in block.directives and not include_slow) or (
            block.text.startswith(GPU_MARK) and not torch.cuda.is_available())
        if skip:
            counts["skipped"] += 1
            last_ran = False
            continue
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            if block.lang == "python":
                _run_python(block, namespace)
            else:
                _run_sh(block)
        last_output, last_ran = captured.getvalue(), True
        counts["ran"] += 1
    return counts


@pytest.fixture
def one_thread():
    # The examples are tiny; on a shared 2-core machine PyTorch's thread pool makes
    # them ten times slower than one thread does.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run_docs(path, tmp_path, monkeypatch, include_slow):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONVDSL_PROGRESS", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", convdsl.ConvDSLWarning)
        counts = run_file(path, tmp_path, include_slow)
    assert counts["ran"] + counts["skipped"] > 0


@pytest.mark.parametrize("path", list(_files(slow=False)))
def test_doc_runs(path, tmp_path, monkeypatch, one_thread):
    _run_docs(path, tmp_path, monkeypatch, include_slow=False)


@pytest.mark.parametrize("path", list(_files(slow=True)))
def test_doc_runs_with_slow_blocks(path, tmp_path, monkeypatch, one_thread):
    _run_docs(path, tmp_path, monkeypatch, include_slow=True)


# -- the runner itself -----------------------------------------------------------------------

SAMPLE = """\
Text.

<!-- doctest: file=tiny.cdsl -->
```cdsl
net Tiny(x: f32[N, 2]) {
    return relu(x)
}
```

```python
import convdsl
net = convdsl.compile("tiny.cdsl")
print(net.name)
```

<!-- doctest: output -->
```text
Tiny
```

<!-- doctest: exit=1 -->
```sh
convdsl check missing.cdsl
```

<!-- doctest: skip -->
```python
this is not python
```

```python
# needs: gpu
import torch
assert torch.cuda.is_available()
```

```sh
pip install convdsl
```
"""


def test_runner_reads_markers_and_checks_outputs(tmp_path, monkeypatch):
    doc = tmp_path / "sample.md"
    doc.write_text(SAMPLE)
    blocks = read_blocks(doc)
    assert [b.lang for b in blocks] == ["cdsl", "python", "text", "sh", "python", "python", "sh"]
    assert blocks[0].directives == {"file": "tiny.cdsl"}
    assert [b.runnable for b in blocks] == [False, True, False, True, False, True, False]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    counts = run_file(doc, work, include_slow=False)
    gpu = torch.cuda.is_available()
    assert counts == {"ran": 2 + gpu, "skipped": 1 - gpu, "outputs": 1}
    doc.write_text(SAMPLE.replace("```text\nTiny", "```text\nSomething else"))
    again = tmp_path / "again"
    again.mkdir()
    monkeypatch.chdir(again)
    with pytest.raises(AssertionError, match="documented output differs"):
        run_file(doc, again, include_slow=False)
    doc.write_text(SAMPLE.replace("<!-- doctest: exit=1 -->\n", ""))
    shutil.rmtree(again / "examples")
    with pytest.raises(AssertionError, match="convdsl check missing.cdsl exited 1"):
        run_file(doc, again, include_slow=False)
