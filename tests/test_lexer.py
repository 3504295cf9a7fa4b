"""Editor support: the Pygments lexer (entry point, pygmentize, rich) and the
VS Code extension's TextMate grammar, checked against the compiler's own tables."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pygments.lexers import get_lexer_by_name, get_lexer_for_filename
from pygments.token import Error, Keyword, Name, Number, String, Token

from convdsl import lexer
from convdsl.lexer import CdslLexer
from convdsl.ops import OPS
from convdsl.ops.inits import INITS
from convdsl.parser import DTYPES as PARSER_DTYPES
from convdsl.parser import KEYWORDS as PARSER_KEYWORDS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.cdsl"))
VSCODE = ROOT / "editors" / "vscode"


def tokens(text: str) -> list[tuple]:
    return [(kind, value) for kind, value in CdslLexer().get_tokens(text) if value.strip()]


def kind_of(text: str, word: str):
    found = [kind for kind, value in tokens(text) if value == word]
    assert found, f"{word!r} not lexed as one token"
    return found[0]


# -- the word lists follow the compiler ----------------------------------------------------

def test_op_names_are_the_op_tables():
    assert list(lexer.OP_NAMES) == OPS.user_facing()


def test_initializers_are_the_init_tables():
    assert sorted(lexer.INITIALIZERS) == sorted(INITS)


def test_keywords_and_dtypes_are_the_parsers():
    assert sorted(lexer.KEYWORDS) == sorted(PARSER_KEYWORDS)
    assert sorted(lexer.DTYPES) == sorted(PARSER_DTYPES)


def test_enum_words_cover_every_enum_choice():
    choices = {c for name in OPS.user_facing() for arg in OPS[name].signature for c in arg.choices}
    assert choices <= set(lexer.ENUM_WORDS)
    assert {"valid", "same", "full", "channel"} <= set(lexer.ENUM_WORDS)  # pad= and axis= words


# -- lexing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_lex_without_error_tokens(path):
    text = path.read_text()
    found = list(CdslLexer().get_tokens(text))
    assert [v for k, v in found if k in Error] == []
    assert "".join(v for _, v in found) == text + ("" if text.endswith("\n") else "\n")


def test_a_stray_character_is_an_error_token():
    # The check above could never fail if the lexer accepted anything.
    assert (Error, "@") in tokens("net A(x: f32[N, 1]) { return x @ x }")


SOURCE = '''# a comment
table T = [[0, 1], [1]]
shared block step(s, k=3) { return tanh(conv(s, 2, kernel=k, pad=same, name="u.v")) }
net A(x: f32[N, 2, H, W], y: bf16[N, 4]) {
    h = tiled(x, 4, kernel=3, tiles=2, bias=tiled, init=normal(1e-3))
    h = step(h) * 0.5 + .25
    return h, leaky_relu(y, slope=2.)
}
'''


def test_token_kinds():
    found = tokens(SOURCE)
    assert found[0] == (Token.Comment.Single, "# a comment")
    assert kind_of(SOURCE, "table") in Keyword.Declaration
    assert kind_of(SOURCE, "shared") in Keyword.Declaration
    assert kind_of(SOURCE, "return") in Keyword
    assert kind_of(SOURCE, "A") is Name.Class
    assert kind_of(SOURCE, "step") is Name.Function         # the block, where declared
    assert kind_of(SOURCE, "f32") is Keyword.Type
    assert kind_of(SOURCE, "bf16") is Keyword.Type
    assert kind_of(SOURCE, "conv") is Name.Builtin
    assert kind_of(SOURCE, "kernel") is Name.Attribute       # keyword argument
    assert kind_of(SOURCE, "k") is Name.Attribute            # a block parameter's default
    assert kind_of(SOURCE, "same") is Name.Constant
    assert kind_of(SOURCE, "normal") is Name.Builtin.Pseudo
    assert kind_of(SOURCE, '"u.v"') in String
    assert kind_of(SOURCE, "1e-3") is Number.Float
    assert kind_of(SOURCE, ".25") is Number.Float
    assert kind_of(SOURCE, "2.") is Number.Float
    # `tiled` is an op where called, a bias mode elsewhere.
    tiled = [k for k, v in found if v == "tiled"]
    assert tiled == [Name.Builtin, Name.Constant]
    # Outside parentheses `h =` is an assignment, not a keyword argument.
    assert (Name, "h") in found and (Name.Attribute, "h") not in found


# -- the entry point: pygmentize and rich -------------------------------------------------

def test_entry_point_registers_the_lexer():
    assert isinstance(get_lexer_by_name("cdsl"), CdslLexer)
    assert isinstance(get_lexer_for_filename("model.cdsl"), CdslLexer)


def test_pygmentize_highlights_lenet():
    pygmentize = shutil.which("pygmentize") or pytest.skip("pygmentize is not on PATH")
    done = subprocess.run([pygmentize, "-l", "cdsl", "-f", "terminal256",
                           str(ROOT / "examples" / "lenet5.cdsl")],
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "\x1b[" in done.stdout and "LeNet5" in done.stdout


def test_importing_the_lexer_does_not_import_torch():
    # Pygments loads every plugin lexer when it guesses a file's language.
    code = "import sys, convdsl.lexer; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


@pytest.mark.parametrize("lexer_arg", [CdslLexer(), "cdsl"], ids=["instance", "by-name"])
def test_rich_highlights_with_the_lexer(lexer_arg):
    from rich.console import Console
    from rich.syntax import Syntax

    console = Console(record=True, force_terminal=True, color_system="truecolor", width=120)
    console.print(Syntax(SOURCE, lexer=lexer_arg, theme="monokai"))
    text = console.export_text(styles=True)
    assert "leaky_relu" in text
    # The builtin op and the keyword get different colours.
    colours = {word: re.search(r"\x1b\[([0-9;]*)m" + word, text).group(1)
               for word in ("conv", "return")}
    assert colours["conv"] != colours["return"]


# -- the VS Code extension ------------------------------------------------------------------

def load(name: str) -> dict:
    return json.loads((VSCODE / name).read_text())


def test_extension_files_parse_and_point_at_each_other():
    manifest = load("package.json")
    load("language-configuration.json")
    grammar = load("syntaxes/cdsl.tmLanguage.json")
    (language,) = manifest["contributes"]["languages"]
    (contributed,) = manifest["contributes"]["grammars"]
    assert language["extensions"] == [".cdsl"]
    assert (VSCODE / language["configuration"]).is_file()
    assert (VSCODE / contributed["path"]).is_file()
    assert contributed["scopeName"] == grammar["scopeName"] == "source.cdsl"
    assert load("language-configuration.json")["comments"]["lineComment"] == "#"


def _rules(node):
    """Every {name/match} rule of a grammar, recursively."""
    if isinstance(node, dict):
        if "match" in node:
            yield node
        for value in node.values():
            yield from _rules(value)
    elif isinstance(node, list):
        for value in node:
            yield from _rules(value)


def _words(grammar: dict, scope_prefix: str) -> set[str]:
    """The alternatives of the `\\b(a|b|c)` rules whose scope starts with the prefix."""
    found: set[str] = set()
    for rule in _rules(grammar["repository"]):
        if rule.get("name", "").startswith(scope_prefix):
            group = re.match(r"\\b\(([A-Za-z0-9_|]+)\)", rule["match"])
            assert group, f"{rule['name']}: expected a \\b(word|word) pattern"
            found |= set(group.group(1).split("|"))
    return found


def test_grammar_word_lists_match_the_lexers():
    grammar = load("syntaxes/cdsl.tmLanguage.json")
    assert _words(grammar, "support.function.builtin.op") == set(lexer.OP_NAMES)
    keywords = (_words(grammar, "storage.type.cdsl") | _words(grammar, "storage.modifier")
                | _words(grammar, "keyword.control") | _words(grammar, "constant.language.boolean"))
    assert keywords == set(lexer.KEYWORDS)
    assert _words(grammar, "support.type.dtype") == set(lexer.DTYPES)
    assert _words(grammar, "support.constant.initializer") == set(lexer.INITIALIZERS)
    assert _words(grammar, "constant.language.enum") == set(lexer.ENUM_WORDS)


def test_grammar_patterns_compile_and_find_ops_and_keyword_arguments():
    grammar = load("syntaxes/cdsl.tmLanguage.json")
    for rule in _rules(grammar):
        re.compile(rule["match"])  # Oniguruma reads these the same way
    repo = grammar["repository"]
    assert re.search(repo["op"]["match"], "h = conv (x, 4)").group(0) == "conv"
    assert re.search(repo["op"]["match"], "bias=tiled)") is None
    assert re.search(repo["keyword-argument"]["match"], "kernel=3").group(1) == "kernel"
    for include in repo["expression"]["patterns"]:
        assert include["include"].lstrip("#") in repo
