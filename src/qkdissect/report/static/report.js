/* qkdissect report: keyboard navigation (no network, no dependencies).
   Head pages: ←/→ previous/next head, ↑/↓ previous/next layer, Esc or h: overview.
   Overview: arrow keys move between heat-map cells, Enter opens the head. */
(function () {
  "use strict";
  var body = document.body;
  var keys = {ArrowLeft: "prev", ArrowRight: "next", ArrowUp: "up", ArrowDown: "down", Escape: "home", h: "home"};
  var moves = {ArrowLeft: [0, -1], ArrowRight: [0, 1], ArrowUp: [-1, 0], ArrowDown: [1, 0]};

  function go(name) {
    var url = body.getAttribute("data-" + name);
    if (!url) { return false; }
    window.location.href = url;
    return true;
  }

  function cell(layer, head) {
    return document.querySelector('a.cell[data-layer="' + layer + '"][data-head="' + head + '"]');
  }

  function moveInGrid(key) {
    var grid = document.getElementById("heatmap");
    if (!grid || !moves[key]) { return false; }
    var active = document.activeElement;
    var target;
    if (!active || !active.classList || !active.classList.contains("cell")) {
      target = cell(0, 0);
    } else {
      var layer = parseInt(active.getAttribute("data-layer"), 10) + moves[key][0];
      var head = parseInt(active.getAttribute("data-head"), 10) + moves[key][1];
      target = cell(layer, head);
    }
    if (!target) { return false; }
    target.focus();
    return true;
  }

  document.addEventListener("keydown", function (event) {
    if (event.altKey || event.ctrlKey || event.metaKey || event.defaultPrevented) { return; }
    var tag = event.target && event.target.tagName;
    if (tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT") { return; }
    var handled = body.getAttribute("data-page") === "overview" ? moveInGrid(event.key) : false;
    if (!handled && keys[event.key]) { handled = go(keys[event.key]); }
    if (handled) { event.preventDefault(); }
  });
}());
