"""The documentation's examples are programs: each ```cdsl block compiles,
each ```cdsl-error block is rejected with a ConvDSLError."""
import re
import warnings
from pathlib import Path

import pytest

import convdsl

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```(cdsl(?:-error)?)\n(.*?)```", re.S)


def blocks():
    for path in DOCS:
        for index, match in enumerate(FENCE.finditer(path.read_text())):
            kind, text = match.groups()
            if "net " in text:
                yield pytest.param(kind, text, id=f"{path.name}#{index}")


@pytest.mark.parametrize("kind,text", list(blocks()))
def test_doc_example(kind, text):
    program = convdsl.compiler.load_program(text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", convdsl.ConvDSLWarning)
        if kind == "cdsl-error":
            with pytest.raises(convdsl.ConvDSLError):
                for name in program.nets:
                    convdsl.compile(text, net=name)
        else:
            for name in program.nets:
                convdsl.compile(text, net=name)


def test_docs_have_examples():
    assert len(list(blocks())) >= 5
