// The fedpipe status page: polls api/status every second and draws what it says. Every value
// from the server (client names included) goes into the page as text, never as markup.
"use strict";
(() => {
  const SVG = "http://www.w3.org/2000/svg";
  const W = 520, H = 220, PAD = { left: 62, right: 16, top: 12, bottom: 32 };
  const LABELS = {
    accuracy: "Accuracy", loss: "Evaluation loss", train_loss: "Training loss",
    replied: "Clients replied", seconds: "Round time (s)",
  };
  const FIRST = ["accuracy", "loss", "train_loss"];
  const LAST = ["replied", "seconds"];
  const COLORS = ["#2563eb", "#dc2626", "#059669", "#7c3aed", "#d97706", "#0891b2", "#db2777"];
  const POLL_MS = 1000;
  const charts = new Map();

  const $ = (id) => document.getElementById(id);
  const setText = (id, value) => { $(id).textContent = value; };

  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
  }

  function duration(seconds) {
    const s = Math.max(0, Math.round(seconds));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    return h ? `${h}h ${m}m` : m ? `${m}m ${r}s` : `${r}s`;
  }

  function number(v) {
    if (!Number.isFinite(v)) return "–";
    if (Number.isInteger(v) && Math.abs(v) < 1e6) return String(v);
    const a = Math.abs(v);
    return a >= 1000 || (a > 0 && a < 0.001) ? v.toExponential(2) : v.toPrecision(4);
  }

  function ordered(keys) {
    const rest = keys.filter((k) => !FIRST.includes(k) && !LAST.includes(k)).sort();
    return [...FIRST, ...rest, ...LAST].filter((k) => keys.includes(k));
  }

  function svg(tag, attrs, parent) {
    const el = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    if (parent) parent.appendChild(el);
    return el;
  }

  function chart(name, index) {
    if (charts.has(name)) return charts.get(name);
    const card = document.createElement("div");
    card.className = "card chart";
    card.id = "chart-" + name;
    const title = document.createElement("h3");
    const label = document.createElement("span");
    label.textContent = LABELS[name] || name;
    const latest = document.createElement("span");
    latest.className = "latest";
    title.append(label, latest);
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": name });
    const axes = svg("g", {}, root);
    const color = COLORS[index % COLORS.length];
    const path = svg("path", { id: "curve-" + name, class: "curve", stroke: color, d: "" }, root);
    const dot = svg("circle", { r: 3.5, fill: color, cx: -10, cy: -10 }, root);
    card.append(title, root);
    $("charts").appendChild(card);
    const made = { card, latest, axes, path, dot };
    charts.set(name, made);
    return made;
  }

  function span(values) {
    let lo = Math.min(...values), hi = Math.max(...values);
    if (values.every(Number.isInteger) && lo >= 0) return [0, 4 * Math.ceil((hi + 1) / 4)]; // counts: whole ticks
    if (lo === hi) { const d = Math.abs(lo) * 0.1 || 1; lo -= d; hi += d; }
    const pad = (hi - lo) * 0.06;
    return [lo - pad, hi + pad];
  }

  function tick(v) {
    const a = Math.abs(v);
    if (a !== 0 && (a < 0.001 || a >= 1e5)) return v.toExponential(1);
    return String(Number(v.toPrecision(3)));
  }

  function draw(c, points) {
    const rounds = points.map((p) => p[0]);
    const values = points.map((p) => p[1]);
    const x0 = Math.min(...rounds), x1 = Math.max(x0 + 1, Math.max(...rounds));
    const [y0, y1] = span(values);
    const iw = W - PAD.left - PAD.right, ih = H - PAD.top - PAD.bottom;
    const x = (r) => PAD.left + ((r - x0) / (x1 - x0)) * iw;
    const y = (v) => PAD.top + (1 - (v - y0) / (y1 - y0)) * ih;
    c.axes.replaceChildren();
    for (let i = 0; i <= 4; i += 1) {
      const v = y0 + ((y1 - y0) * i) / 4, yy = y(v);
      svg("line", { class: "grid", x1: PAD.left, x2: W - PAD.right, y1: yy, y2: yy }, c.axes);
      const t = svg("text", { class: "axis-label", x: PAD.left - 8, y: yy + 4, "text-anchor": "end" }, c.axes);
      t.textContent = tick(v);
    }
    const ticks = [...new Set([x0, Math.round((x0 + x1) / 2), x1])];
    ticks.forEach((r, i) => {
      const anchor = i === 0 ? "start" : i === ticks.length - 1 ? "end" : "middle";
      const t = svg("text", { class: "axis-label", x: x(r), y: H - 8, "text-anchor": anchor }, c.axes);
      t.textContent = "round " + r;
    });
    const d = points.map((p, i) => `${i ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`);
    c.path.setAttribute("d", d.join(" "));
    c.path.setAttribute("data-points", String(points.length));
    const last = points[points.length - 1];
    c.dot.setAttribute("cx", x(last[0]).toFixed(1));
    c.dot.setAttribute("cy", y(last[1]).toFixed(1));
    c.latest.textContent = `${number(last[1])} at round ${last[0]}`;
  }

  function phaseClass(phase) {
    return "pill pill-" + String(phase).split(" ")[0].replace(/[^a-z]/g, "");
  }

  function clients(list) {
    const body = $("clients").querySelector("tbody");
    body.replaceChildren();
    for (const c of list) {
      const row = document.createElement("tr");
      const cells = [
        [c.name, "name"], [c.train_samples, "num"], [c.eval_samples, "num"],
        [c.set_up ? "yes" : "joining", c.set_up ? "yes" : "no"], [c.rounds_aggregated, "num"],
      ];
      for (const [value, cls] of cells) {
        const td = document.createElement("td");
        td.className = cls;
        td.textContent = String(value);
        row.appendChild(td);
      }
      body.appendChild(row);
    }
    $("no-clients").hidden = list.length > 0;
  }

  function render(s) {
    document.title = `fedpipe · ${s.run_id} · round ${s.round}/${s.rounds}`;
    setText("run-id", s.run_id);
    const phase = $("phase");
    phase.textContent = s.status === "running" ? s.phase : `${s.status}${s.reason ? ": " + s.reason : ""}`;
    phase.className = phaseClass(s.status === "running" ? s.phase : s.status);
    setText("round", `${s.round} / ${s.rounds}`);
    $("round-bar").style.width = `${Math.min(100, (100 * s.rounds_completed) / s.rounds)}%`;
    setText("clients-count", String(s.clients.length));
    setText("clients-min", `${s.min_clients} needed to start`);
    setText("completed", String(s.rounds_completed));
    setText("failed", s.rounds_failed ? `${s.rounds_failed} failed (model unchanged)` : "none failed");
    setText("elapsed", duration(s.now - s.started));
    const secs = s.series.seconds;
    setText("last-round", secs && secs.length ? `last round ${number(secs[secs.length - 1][1])} s` : "");
    setText("traffic-in", bytes(s.bytes_received) + " in");
    setText("traffic-out", bytes(s.bytes_sent) + " out");
    clients(s.clients);
    ordered(Object.keys(s.series)).forEach((name, i) => {
      const points = s.series[name];
      if (points.length) draw(chart(name, i), points);
    });
    setText("footer", "Updated " + new Date().toLocaleTimeString() + " · refreshes every second");
  }

  async function poll() {
    try {
      const reply = await fetch("api/status", { cache: "no-store", credentials: "same-origin" });
      if (reply.status === 401) {
        setText("footer", "Not signed in: open this page once as /?token=<status token>.");
        return; // no point asking again without the token
      }
      if (!reply.ok) throw new Error(`HTTP ${reply.status}`);
      render(await reply.json());
    } catch (err) {
      const phase = $("phase");
      phase.textContent = "server unreachable";
      phase.className = "pill pill-lost";
      setText("footer", `Lost the server (${err.message}); the run may have ended. Retrying…`);
    }
    setTimeout(poll, POLL_MS);
  }

  poll();
})();
