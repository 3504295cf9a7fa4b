"""A Pygments lexer for .cdsl files.

Registered as the `cdsl` entry point, so `pygmentize -l cdsl FILE` and
`rich.syntax.Syntax(text, lexer="cdsl")` highlight .cdsl source. The word lists
are static (the lexer must not import torch); tests/test_lexer.py checks them
against the op table, the initializers and the grammar, and the VS Code
grammar in editors/vscode/ against them.
"""
from __future__ import annotations

from typing import ClassVar

from pygments.lexer import RegexLexer, bygroups, include, words
from pygments.token import Comment, Keyword, Name, Number, Operator, Punctuation, String, Whitespace

# LANGUAGE.md §1: the reserved words, split by role.
DECLARATION_KEYWORDS = ("net", "block", "table")
MODIFIER_KEYWORDS = ("shared",)
CONTROL_KEYWORDS = ("return",)
CONSTANT_KEYWORDS = ("true", "false")
KEYWORDS = DECLARATION_KEYWORDS + MODIFIER_KEYWORDS + CONTROL_KEYWORDS + CONSTANT_KEYWORDS

DTYPES = ("f32", "f16", "bf16")

# convdsl.ops.OPS.user_facing(), in its (sorted) order.
OP_NAMES = (
    "avgpool", "concat", "conv", "deconv", "dense", "depthwise", "elu", "flatten", "identity",
    "leaky_relu", "local", "log_softmax", "lppool", "maxout", "maxpool", "relu", "sigmoid",
    "softmax", "softplus", "split", "tanh", "tiled", "wavgpool",
)

# convdsl.ops.inits.INITS: the values `init=` takes.
INITIALIZERS = ("he", "xavier", "zeros", "normal", "uniform", "gaussian", "edges", "gabor",
                "kmeans")

# Bare words read as enum values: padding modes, bias modes, the channel axis.
ENUM_WORDS = ("valid", "same", "full", "channel", "none", "location", "tiled")

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"


class CdslLexer(RegexLexer):
    """Nets, blocks and tables of the convdsl language."""

    name = "convdsl"
    aliases: ClassVar[list[str]] = ["cdsl", "convdsl"]
    filenames: ClassVar[list[str]] = ["*.cdsl"]
    mimetypes: ClassVar[list[str]] = ["text/x-cdsl"]

    tokens: ClassVar[dict] = {
        "root": [
            include("common"),
            (r"\)", Punctuation),  # unbalanced: keep lexing rather than give an Error token
        ],
        # Inside parentheses `name=` is a keyword argument (or a block parameter's
        # default); outside it is an assignment, so the two need separate states.
        "call": [
            (rf"({_NAME})(\s*)(=)", bygroups(Name.Attribute, Whitespace, Operator)),
            (r"\)", Punctuation, "#pop"),
            include("common"),
        ],
        "common": [
            (r"\s+", Whitespace),
            (r"#.*?$", Comment.Single),
            (rf"(net)(\s+)({_NAME})", bygroups(Keyword.Declaration, Whitespace, Name.Class)),
            (rf"(block)(\s+)({_NAME})", bygroups(Keyword.Declaration, Whitespace, Name.Function)),
            (rf"(table)(\s+)({_NAME})",
             bygroups(Keyword.Declaration, Whitespace, Name.Variable.Global)),
            (words(DECLARATION_KEYWORDS + MODIFIER_KEYWORDS, suffix=r"\b"), Keyword.Declaration),
            (words(CONTROL_KEYWORDS, suffix=r"\b"), Keyword),
            (words(CONSTANT_KEYWORDS, suffix=r"\b"), Keyword.Constant),
            (words(DTYPES, suffix=r"\b"), Keyword.Type),
            # An op is a builtin only where it is called: `tiled` is also a bias mode.
            (words(OP_NAMES, prefix=r"\b", suffix=r"(?=\s*\()"), Name.Builtin),
            (words(INITIALIZERS, prefix=r"\b", suffix=r"\b"), Name.Builtin.Pseudo),
            (words(ENUM_WORDS, prefix=r"\b", suffix=r"\b"), Name.Constant),
            (rf"{_NAME}(?=\s*\()", Name.Function),  # a block call
            (_NAME, Name),
            # Numbers as grammar/convdsl.lark reads them.
            (r"[0-9]+\.[0-9]*([eE][+-]?[0-9]+)?", Number.Float),
            (r"\.[0-9]+([eE][+-]?[0-9]+)?", Number.Float),
            (r"[0-9]+[eE][+-]?[0-9]+", Number.Float),
            (r"[0-9]+", Number.Integer),
            (r'"([^"\\\n]|\\.)*"', String.Double),
            (r"[+\-*=]", Operator),
            (r"\(", Punctuation, "call"),
            (r"[\[\]{},:.]", Punctuation),
        ],
    }


__all__ = ["DTYPES", "ENUM_WORDS", "INITIALIZERS", "KEYWORDS", "OP_NAMES", "CdslLexer"]
