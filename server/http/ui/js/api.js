// The HTTP API as the console uses it: the key (session storage only), errors as the server words them,
// and server-sent events read from a fetch (EventSource cannot send an Authorization header).

const KEY = "adapterd.key";

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

export const key = {
  get: () => sessionStorage.getItem(KEY),
  set: (value) => sessionStorage.setItem(KEY, value),
  forget: () => sessionStorage.removeItem(KEY),
};

function headers(extra = {}) {
  const sent = { ...extra };
  const value = key.get();
  if (value) sent.authorization = `Bearer ${value}`;
  return sent;
}

// The server's own message: {"error": {"message"}} (OpenAI shape) or {"error": "..."} (TGI shape).
export function messageOf(body, status) {
  const error = body && body.error;
  if (typeof error === "string") return error;
  if (error && typeof error.message === "string") return error.message;
  return `HTTP ${status}`;
}

async function failed(response) {
  const text = await response.text();
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    body = null;
  }
  return new ApiError(response.status, body ? messageOf(body, response.status) : text || `HTTP ${response.status}`, body);
}

export async function request(method, path, { json, body, contentType } = {}) {
  const init = { method, headers: headers() };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["content-type"] = "application/json";
  } else if (body !== undefined) {
    init.body = body;
    if (contentType) init.headers["content-type"] = contentType;
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await failed(response);
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response.text();
}

export const get = (path) => request("GET", path);

// POST (or GET) a stream of server-sent events; calls onData with each event's parsed data until the
// stream ends or "[DONE]". Returns when the stream is over; `signal` aborts it.
export async function streamEvents(method, path, { json, signal, onData }) {
  const init = { method, headers: headers({ accept: "text/event-stream" }), signal };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["content-type"] = "application/json";
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await failed(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = event
        .split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      onData(JSON.parse(data));
    }
  }
}

// Prometheus text -> {metric: {labelValue: number}} for the metrics keyed by one label.
export function parseMetrics(text, label) {
  const out = {};
  const line = new RegExp(`^([a-zA-Z_:][a-zA-Z0-9_:]*)\\{(?:[^}]*,)?${label}="((?:[^"\\\\]|\\\\.)*)"[^}]*\\}\\s+(\\S+)`);
  for (const row of text.split("\n")) {
    const match = row.match(line);
    if (!match) continue;
    const [, name, value, number] = match;
    const unescaped = value.replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    (out[name] ||= {})[unescaped] = Number(number);
  }
  return out;
}
