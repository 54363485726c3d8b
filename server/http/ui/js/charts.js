// Two SVG charts, drawn by hand (no library): a line of points (the loss curve) and grouped bars (scores).
// Every point and bar is its own element with a <title>, so a hover names its value.

const NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#888888", "#3b75af", "#e0823d", "#4f9d57", "#b24c63", "#7b62a8"];

function svg(tag, attributes = {}, text) {
  const node = document.createElementNS(NS, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function scale(domain, range) {
  const [d0, d1] = domain[0] === domain[1] ? [domain[0] - 1, domain[1] + 1] : domain;
  return (x) => range[0] + ((x - d0) / (d1 - d0)) * (range[1] - range[0]);
}

function axes(root, width, height, pad, yDomain, xLabel, yLabel) {
  root.append(svg("line", { x1: pad, y1: height - pad, x2: width - 8, y2: height - pad, class: "axis" }));
  root.append(svg("line", { x1: pad, y1: 8, x2: pad, y2: height - pad, class: "axis" }));
  const y = scale(yDomain, [height - pad, 8]);
  for (const value of [yDomain[0], (yDomain[0] + yDomain[1]) / 2, yDomain[1]]) {
    root.append(svg("text", { x: pad - 4, y: y(value) + 4, "text-anchor": "end", class: "tick" }, value.toFixed(3)));
  }
  if (xLabel) root.append(svg("text", { x: width / 2, y: height - 6, "text-anchor": "middle", class: "label" }, xLabel));
  if (yLabel) root.append(svg("text", { x: pad + 6, y: 16, class: "label" }, yLabel));
  return y;
}

// points: [[x, y], ...]
export function lineChart(points, { xLabel = "", yLabel = "", width = 520, height = 220 } = {}) {
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart line-chart", role: "img" });
  const pad = 48;
  if (!points.length) return root;
  const xs = points.map((p) => p[0]);
  const ys = points.map((p) => p[1]);
  const y = axes(root, width, height, pad, [Math.min(0, ...ys), Math.max(...ys)], xLabel, yLabel);
  const x = scale([Math.min(...xs), Math.max(...xs)], [pad, width - 12]);
  root.append(svg("polyline", { points: points.map(([a, b]) => `${x(a)},${y(b)}`).join(" "), class: "line" }));
  for (const [a, b] of points) {
    const dot = svg("circle", { cx: x(a), cy: y(b), r: 3, class: "point", "data-x": a, "data-y": b });
    dot.append(svg("title", {}, `${xLabel || "x"} ${a}: ${b.toFixed(4)}`));
    root.append(dot);
  }
  root.append(svg("text", { x: x(xs[0]), y: height - pad + 14, "text-anchor": "middle", class: "tick" }, xs[0]));
  root.append(svg("text", { x: x(xs.at(-1)), y: height - pad + 14, "text-anchor": "middle", class: "tick" }, xs.at(-1)));
  return root;
}

// bars: [{label, value, error?}], one colour per bar (the first, the base, grey).
export function barChart(bars, { title = "", width = 420, height = 220 } = {}) {
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart bar-chart", role: "img" });
  const pad = 48;
  const top = Math.max(1e-9, ...bars.map((b) => b.value + (b.error || 0)));
  const y = axes(root, width, height, pad, [0, top], "", title);
  const slot = (width - pad - 12) / Math.max(1, bars.length);
  bars.forEach((bar, i) => {
    const x0 = pad + i * slot + slot * 0.15;
    const rect = svg("rect", {
      x: x0, y: y(bar.value), width: slot * 0.7, height: Math.max(0, y(0) - y(bar.value)),
      fill: PALETTE[i % PALETTE.length], class: "bar", "data-label": bar.label, "data-value": bar.value,
    });
    rect.append(svg("title", {}, `${bar.label}: ${bar.value.toFixed(4)}${bar.error ? ` ± ${bar.error.toFixed(4)}` : ""}`));
    root.append(rect);
    if (bar.error) {
      const cx = x0 + slot * 0.35;
      root.append(svg("line", { x1: cx, x2: cx, y1: y(bar.value - bar.error), y2: y(bar.value + bar.error), class: "error-bar" }));
    }
    root.append(svg("text", { x: x0 + slot * 0.35, y: height - pad + 14, "text-anchor": "middle", class: "tick" }, bar.label));
    root.append(svg("text", { x: x0 + slot * 0.35, y: y(bar.value) - 3, "text-anchor": "middle", class: "tick" }, bar.value.toFixed(3)));
  });
  return root;
}
