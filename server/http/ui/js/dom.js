// Small helpers to build the pages: elements from a tag, attributes and children (text is always text).

export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  node.append(...children.flat().filter((c) => c !== undefined && c !== null && c !== false));
  return node;
}

// Replace a node's children; absent ones (null, undefined, false) are left out.
export function fill(node, ...children) {
  node.replaceChildren(...children.flat().filter((c) => c !== undefined && c !== null && c !== false));
  return node;
}

export function table(columns, rows) {
  return el(
    "table",
    {},
    el("thead", {}, el("tr", {}, columns.map((c) => el("th", {}, c)))),
    el("tbody", {}, rows.map((row) => el("tr", {}, row.map((cell) => el("td", {}, cell ?? "-"))))),
  );
}

// A form's filled-in number fields: `integers` parsed as integers, `numbers` as floats; empty ones left out.
export function formNumbers(form, integers, numbers) {
  const sent = {};
  for (const [names, parse] of [[integers, (v) => parseInt(v, 10)], [numbers, parseFloat]]) {
    for (const name of names) {
      const value = form.elements[name].value.trim();
      if (value !== "") sent[name] = parse(value);
    }
  }
  return sent;
}

export function bytes(n) {
  if (typeof n !== "number") return "-";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function when(iso) {
  if (!iso) return "-";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? String(iso) : date.toISOString().replace("T", " ").slice(0, 19);
}

export const number = (x, digits = 4) => (typeof x === "number" ? x.toFixed(digits) : "-");
