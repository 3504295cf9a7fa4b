"""The IR explorer (convdsl/explore/): one self-contained HTML page whose source
lines, IR nodes (every stage) and kernels are linked; checked as markup with
html.parser, against the compiler's own printouts, and in headless Chromium."""
import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from types import SimpleNamespace

import pytest

import convdsl
from convdsl.cli import main
from convdsl.explore import write_report
from convdsl.explore.collect import explore_net
from convdsl.explore.layout import NodeLinks, graph_svg
from convdsl.explore.page import render
from convdsl.passes import PIPELINE

EVIL = '<script>alert("x")</script>'

# A comment that tries to close the page's markup, and a layer named by a string.
TINY = f"""# {EVIL} & </pre></span> "quoted" 'single'
net Tiny(x: f32[N, 3, 12, 12]) {{
    h = relu(conv(x, 4, kernel=3, pad=same))   # {EVIL}
    h = maxpool(h, 2)
    return dense(flatten(h), 5, name="head.out")
}}
"""

DENSE = "net D(x: f32[N, 20]) {\n    return dense(x, 5, bias=none)\n}\n"

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}


class Checker(HTMLParser):
    """Tags balanced (void and self-closed tags aside), ids unique, attributes kept."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.ids, self.errors = [], {}, []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        self._attrs(tag, attrs)
        if tag == "script":
            self.scripts += 1
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self._attrs(tag, attrs)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()

    def _attrs(self, tag, attrs):
        found = dict(attrs)
        if "id" in found:
            if found["id"] in self.ids:
                self.errors.append(f"duplicate id {found['id']}")
            self.ids[found["id"]] = (tag, found)


def check(page: str) -> Checker:
    checker = Checker()
    checker.feed(page)
    checker.close()
    assert checker.errors == [] and checker.stack == []
    return checker


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("explore") / "odd & <name>.cdsl"
    path.write_text(TINY)
    found = explore_net(path, sizes={"N": 4})
    return SimpleNamespace(path=path, found=found, page=render(found, use_dot=False))


def test_page_is_well_formed_with_the_expected_ids(tiny):
    found = tiny.found
    page = tiny.page
    checker = check(page)
    for expected in ("source", "ir", "kernels", "stage-tabs", "selftest", "net-name",
                     "file-name", "L1", f"L{len(TINY.splitlines())}", "stage-0", "k0"):
        assert expected in checker.ids, expected
    assert len([i for i in checker.ids if re.fullmatch(r"stage-\d+", i)]) == len(found.stages)
    assert len([i for i in checker.ids if re.fullmatch(r"k\d+", i)]) == len(found.kernels)


def test_user_text_is_escaped(tiny):
    path = tiny.path
    page = tiny.page
    checker = check(page)
    assert checker.scripts == 1  # the page's own script, not the one in the comment
    assert EVIL not in page and "</pre></span> &quot;" not in page
    assert "&lt;script&gt;alert(" in page  # shown, as text
    assert "odd &amp; &lt;name&gt;.cdsl" in page and path.name not in page


def test_page_fetches_nothing(tiny):
    page = tiny.page
    assert not re.search(r"<(link|img|iframe|object|embed)\b", page)
    assert not re.search(r"""\b(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page and "url(http" not in page


def test_stages_are_the_pipeline_and_end_where_the_compiler_ends(tiny):
    path = tiny.path
    found = tiny.found
    net = convdsl.compile(path, backend="torch")
    forward = [s for s in found.stages if s.direction == "forward"]
    backward = [s for s in found.stages if s.direction == "backward"]
    assert [s.name for s in forward] == ["parsed", *(p.name for p in PIPELINE)]
    assert forward[0].text == net.ir("parsed")
    assert forward[-1].text == net.ir("optimized")
    assert backward[0].name == "backward" and backward[-1].text == net.ir("backward")
    assert any(s.changed for s in forward[1:])  # the optimizer did something to this net


def test_source_lines_link_to_nodes_and_kernels(tiny):
    found = tiny.found
    page = tiny.page
    checker = check(page)
    conv_line = 3  # h = relu(conv(x, ...))
    assert "linked" in checker.ids[f"L{conv_line}"][1]["class"]
    linked = [(i, attrs) for i, (tag, attrs) in checker.ids.items()
              if str(conv_line) in attrs.get("data-lines", "").split()]
    text_nodes = [i for i, a in linked if re.fullmatch(r"s\d+t\d+", i)]
    pictured = [i for i, a in linked if re.fullmatch(r"s\d+g\d+", i)]
    kernels = [i for i, a in linked if re.fullmatch(r"k\d+", i)]
    # The conv (and its relu) in every stage, in the printout and in the picture.
    assert len(text_nodes) >= len(found.stages) and len(pictured) == len(text_nodes)
    # Its inference, training and backward kernels (the gradients are written on its line too).
    programs = {found.kernels[int(k[1:])].program for k in kernels}
    assert programs == {"inference", "training", "backward"}
    # Every key a kernel names is a node shown somewhere on the page.
    node_keys = {k for i, (tag, a) in checker.ids.items() if re.fullmatch(r"s\d+[tg]\d+", i)
                 for k in a["data-keys"].split()}
    for i, (tag, attrs) in checker.ids.items():
        if re.fullmatch(r"k\d+", i):
            assert set(attrs["data-keys"].split()) <= node_keys, i


def test_every_node_links_to_the_line_it_was_written_on(tiny):
    found = tiny.found
    page = tiny.page
    checker = check(page)
    for stage in found.stages:
        for node in stage.graph.nodes():
            _tag, attrs = checker.ids[f"s{stage.index}t{node.id}"]
            assert str(node.span.line) in attrs["data-lines"].split()
            assert checker.ids[f"s{stage.index}g{node.id}"][1]["data-keys"] == attrs["data-keys"]


def test_cost_model_uses_the_given_sizes(tmp_path):
    path = tmp_path / "d.cdsl"
    path.write_text(DENSE)
    for n in (4, 32):
        sizes = {"N": n} if n != 32 else {}  # 32: the default for unset symbols
        found = explore_net(path, sizes=sizes)
        (dense,) = [k for k in found.kernels if k.program == "inference"]
        assert dense.flops == 2 * n * 20 * 5  # the GEMM's multiply-adds
        assert dense.bytes == (n * 20 + n * 5 + 20 * 5) * 4  # x, y, weight in f32
        assert found.sizes == {"N": n}


def test_unknown_size_is_a_user_error(tmp_path):
    path = tmp_path / "d.cdsl"
    path.write_text(DENSE)
    with pytest.raises(convdsl.ConvDSLError, match="no input of net D uses"):
        explore_net(path, sizes={"H": 8})


@pytest.mark.parametrize("use_dot", [False, True])
def test_graph_pictures(use_dot, tiny):
    if use_dot and shutil.which("dot") is None:
        pytest.skip("Graphviz dot is not installed")
    found = tiny.found
    stage = found.stages[-1]
    links = {n.id: NodeLinks(f"s9g{n.id}", f"b{n.id}", str(n.span.line))
             for n in stage.graph.nodes()}
    svg = graph_svg(stage.graph, links, "s9", use_dot=use_dot)
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    checker = check(svg)
    for node in stage.graph.nodes():
        tag, attrs = checker.ids[f"s9g{node.id}"]
        assert tag == "g" and "irnode" in attrs["class"]
        assert attrs["data-keys"] == f"b{node.id}"
    operands = sum(len(n.inputs) if use_dot else len(set(n.inputs)) for n in stage.graph.nodes())
    returns = len(stage.graph.outputs) if use_dot else 0  # dot also draws the return arrows
    assert svg.count('class="edge"') == operands + returns


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def selftest(page_path) -> dict:
    """Load the page in headless Chromium with ?selftest=1 and read what its script saw."""
    done = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
         f"{page_path.as_uri()}?selftest=1"], capture_output=True, text=True, timeout=120, check=False)
    match = re.search(r'<pre id="selftest">(.*?)</pre>', done.stdout, re.DOTALL)
    assert match, f"no self-test result in the page:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    return json.loads(html.unescape(match.group(1)))


def test_cli_writes_the_page(tmp_path, capsys):
    source = tmp_path / "tiny.cdsl"
    source.write_text(TINY)
    out = tmp_path / "report.html"
    assert main(["explore", str(source), "-o", str(out), "--shape", "N=2"]) == 0
    assert "written to" in capsys.readouterr().out
    page = out.read_text()
    check(page)
    assert "<code>N=2</code>" in page


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed")
def test_dot_pictures_highlight_in_chromium(tmp_path):
    if shutil.which("dot") is None:
        pytest.skip("Graphviz dot is not installed")
    source = tmp_path / "tiny.cdsl"
    source.write_text(TINY)
    out = tmp_path / "report.html"
    write_report(source, out, sizes={"N": 2}, use_dot=True)
    result = selftest(out)
    assert result["errors"] == [] and result["line"] == "L3"
    assert result["svgNodes"] == result["irLines"] > 0


def test_cli_user_errors(tmp_path, capsys):
    source = tmp_path / "tiny.cdsl"
    source.write_text(TINY)
    out = tmp_path / "report.html"
    assert main(["explore", str(source), "-o", str(out), "--shape", "Q=2"]) == 1
    assert "Q, which no input of net Tiny uses" in capsys.readouterr().err
    assert main(["explore", str(source), "-o", str(out), "--target", "sm_12"]) == 1
    assert "unknown target 'sm_12'" in capsys.readouterr().err
    source.write_text(TINY.replace("maxpool", "maxpoool"))
    assert main(["explore", str(source), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "tiny.cdsl:4:" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed")
def test_click_on_a_source_line_highlights_its_nodes_in_chromium(tiny, tmp_path):
    found = tiny.found
    page = tiny.page
    out = tmp_path / "report.html"
    out.write_text(page)
    result = selftest(out)
    assert result["errors"] == []
    # The first line with a kernel: the conv's. Its nodes light up in every stage's
    # printout and picture, and its kernels in the tables.
    assert result["line"] == "L3" and result["lineHighlighted"] is True
    conv_nodes = sum(1 for s in found.stages for n in s.graph.nodes() if n.span.line == 3)
    assert result["irLines"] >= conv_nodes and result["svgNodes"] == result["irLines"]
    assert result["kernels"] >= 3
    # A click on a node (the input, first in the printout) lights up its line.
    assert result["nodeLines"] == ["L2"]
    forward = [s for s in found.stages if s.direction == "forward"]
    assert result["nodeCopies"] == 2 * len(forward)  # printout and picture, every stage


@pytest.mark.slow
def test_ahead_of_time_report_on_the_page(tmp_path):
    source = tmp_path / "d.cdsl"
    source.write_text(DENSE)
    found = explore_net(source, sizes={"N": 8}, target="sm_90")
    page = render(found, use_dot=False)
    check(page)
    assert "<th>regs</th>" in page and "<code>sm_90</code>" in page
    compiled = [k for k in found.kernels if k.source]
    assert compiled and all(k.aot and k.aot["registers"] > 0 and k.aot["spills"] == 0
                            for k in compiled)
