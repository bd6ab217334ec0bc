// Sorting and filtering, written here: no library, nothing loaded from elsewhere.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("page-data").textContent);
  function key(row, i) {
    var cell = row.cells[i];
    var v = cell ? cell.getAttribute("data-sort") : null;
    if (v === null || v === "") return null;
    var n = Number(v);
    return isNaN(n) ? v : n;
  }
  function sortBy(table, i, th) {
    var body = table.tBodies[0];
    var dir = th.getAttribute("aria-sort") === "ascending" ? "descending" : "ascending";
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir);
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a, i), y = key(b, i);
      if (x === null && y === null) return 0;
      if (x === null) return 1;  // cells without a number stay last either way
      if (y === null) return -1;
      var s = (typeof x === "number" && typeof y === "number") ? x - y : String(x).localeCompare(String(y));
      return dir === "ascending" ? s : -s;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, i) {
      th.addEventListener("click", function () { sortBy(table, i, th); });
    });
  });
  var family = document.getElementById("filter-family"), name = document.getElementById("filter-name");
  if (family && data.families) {
    data.families.forEach(function (f) {
      var option = document.createElement("option");
      option.value = f; option.textContent = f;  // text, never markup
      family.appendChild(option);
    });
  }
  function applyFilter() {
    var f = family ? family.value : "", q = name ? name.value.toLowerCase() : "";
    Array.prototype.forEach.call(document.querySelectorAll("[data-filterable] tr[data-method], [data-filterable] figure[data-method]"), function (el) {
      var show = (!f || el.getAttribute("data-family") === f) &&
                 (!q || el.getAttribute("data-method").toLowerCase().indexOf(q) >= 0);
      el.hidden = !show;
    });
  }
  if (family) family.addEventListener("change", applyFilter);
  if (name) name.addEventListener("input", applyFilter);
  if (data.descriptions) {
    Array.prototype.forEach.call(document.querySelectorAll("th.method[data-method]"), function (th) {
      var d = data.descriptions[th.getAttribute("data-method")];
      if (d) th.title = d;  // a property, never HTML
    });
  }
})();
