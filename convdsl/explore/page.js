// The explorer's links. Source lines are #L<n>; everything tied to lines has
// data-lines, everything tied to IR nodes has data-keys (the same node in every
// stage and the kernels that compute it). A click highlights (class "hl") the
// clicked item's relatives. With ?selftest=1 the page clicks for itself and
// writes what it saw into #selftest, for a headless browser to read back.
"use strict";
(function () {
  const errors = [];
  window.addEventListener("error", (event) => errors.push(String(event.message)));

  const byLine = new Map();
  const byKey = new Map();
  const add = (map, key, element) => {
    if (!map.has(key)) map.set(key, []);
    map.get(key).push(element);
  };
  const words = (text) => (text || "").split(" ").filter((word) => word.length > 0);

  document.querySelectorAll("[data-lines]").forEach((element) => {
    words(element.getAttribute("data-lines")).forEach((line) => add(byLine, line, element));
  });
  document.querySelectorAll("[data-keys]").forEach((element) => {
    words(element.getAttribute("data-keys")).forEach((key) => add(byKey, key, element));
  });

  const clear = () => {
    document.querySelectorAll(".hl").forEach((element) => element.classList.remove("hl"));
  };
  const mark = (element) => {
    if (element) element.classList.add("hl");
  };

  // A source line: its nodes in every stage, and the kernels that compute them.
  function selectLine(line) {
    clear();
    mark(document.getElementById("L" + line));
    (byLine.get(String(line)) || []).forEach(mark);
  }

  // A node or a kernel: the same node(s) everywhere, their kernels, their lines.
  function selectItem(element) {
    clear();
    mark(element);
    words(element.getAttribute("data-keys")).forEach((key) => (byKey.get(key) || []).forEach(mark));
    const lines = words(element.getAttribute("data-lines"));
    lines.forEach((line) => mark(document.getElementById("L" + line)));
    const first = document.getElementById("L" + lines[0]);
    if (first && first.scrollIntoView) first.scrollIntoView({ block: "nearest" });
  }

  function showStage(id) {
    document.querySelectorAll(".stage").forEach((stage) => {
      stage.classList.toggle("active", stage.id === id);
    });
    // A kernel's name jumps to its source listing: open it.
  document.querySelectorAll("a.kname").forEach((link) => {
    link.addEventListener("click", () => {
      const listing = document.getElementById(link.getAttribute("href").slice(1));
      if (listing) listing.open = true;
    });
  });
  document.querySelectorAll(".tab").forEach((tab) => {
      tab.classList.toggle("active", tab.getAttribute("data-stage") === id);
    });
  }

  document.querySelectorAll(".src.linked").forEach((element) => {
    element.addEventListener("click", () => selectLine(element.getAttribute("data-line")));
  });
  document.querySelectorAll("[data-keys]").forEach((element) => {
    element.addEventListener("click", (event) => {
      event.stopPropagation();
      selectItem(element);
    });
  });
  // A kernel's name jumps to its source listing: open it.
  document.querySelectorAll("a.kname").forEach((link) => {
    link.addEventListener("click", () => {
      const listing = document.getElementById(link.getAttribute("href").slice(1));
      if (listing) listing.open = true;
    });
  });
  document.querySelectorAll(".tab").forEach((tab) => {
    tab.addEventListener("click", () => showStage(tab.getAttribute("data-stage")));
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") clear();
  });

  // Open on the last forward stage: the optimized graph the kernels come from.
  const forward = document.querySelectorAll('.stage[data-direction="forward"]');
  if (forward.length) showStage(forward[forward.length - 1].id);

  if (new URLSearchParams(window.location.search).get("selftest") === "1") {
    const count = (selector) => document.querySelectorAll(selector).length;
    const result = { errors: errors };
    // The first source line with a kernel (else with a node), clicked like a user would.
    const kernelLines = [];
    document.querySelectorAll("tr.kernel").forEach((row) => {
      words(row.getAttribute("data-lines")).forEach((line) => kernelLines.push(Number(line)));
    });
    const line = kernelLines.length
      ? document.getElementById("L" + Math.min(...kernelLines))
      : document.querySelector(".src.linked");
    if (line) {
      line.dispatchEvent(new MouseEvent("click", { bubbles: true }));
      result.line = line.id;
      result.lineHighlighted = line.classList.contains("hl");
      result.irLines = count(".irline.hl[id]");  // not a fused node's step lines
      result.svgNodes = count(".irnode.hl");
      result.kernels = count("tr.kernel.hl");
    }
    const node = document.querySelector(".stage.active .irline[data-keys]");
    if (node) {
      node.dispatchEvent(new MouseEvent("click", { bubbles: true }));
      result.node = node.id;
      result.nodeLines = Array.from(document.querySelectorAll(".src.hl")).map((el) => el.id);
      result.nodeCopies = count(".irline.hl[id]") + count(".irnode.hl");
    }
    const out = document.getElementById("selftest");
    out.textContent = JSON.stringify(result);
    out.hidden = false;
  }
})();
