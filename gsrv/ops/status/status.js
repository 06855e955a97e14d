// gsrv's status page (the admin listener's /): /status.json every second, drawn without a
// framework. With [admin] auth the page asks for a token once (kept in sessionStorage, sent as
// Authorization: Bearer) when gsrv answers 401.
"use strict";
(() => {
  const COLORS = ["#1565c0", "#c62828", "#2e7d32", "#6a1b9a", "#ef6c00", "#00838f", "#5d4037"];
  const $ = (id) => document.getElementById(id);
  let token = sessionStorage.getItem("gsrv-admin-token");
  let control = false;
  window.gsrvDraws = 0;  // for tests and the curious: how many times the page drew

  const headers = () => (token ? {Authorization: "Bearer " + token} : {});
  const size = (n) => {
    if (n === null || n === undefined) return "-";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return (i ? n.toFixed(1) : String(Math.round(n))) + units[i];
  };
  const cell = (row, text, cls) => {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    row.appendChild(td);
    return td;
  };
  const rows = (id, items, fill) => {
    const body = $(id).tBodies[0];
    body.replaceChildren(...items.map((item) => { const tr = document.createElement("tr"); fill(tr, item); return tr; }));
  };

  const services = (list) => rows("services", list, (tr, s) => {
    cell(tr, s.name);
    cell(tr, s.ready ? "serving" : "held", s.ready ? "good" : "bad");
    cell(tr, String(s.sessions), "num");
    cell(tr, String(s.max_sessions), "num");
    cell(tr, String(s.pending), "num");
    cell(tr, s.backlog === null ? "-" : String(s.backlog), "num opt");
    cell(tr, s.paused.join(", ") || "-", "opt");
    const td = cell(tr, "");
    if (control) {
      const paused = s.paused.includes("paused_by_admin") || s.paused.includes("drained_by_admin");
      for (const action of paused ? ["resume"] : ["pause", "drain"]) {
        const button = document.createElement("button");
        button.textContent = action;
        button.onclick = () => post(`/services/${encodeURIComponent(s.name)}/${action}`);
        td.appendChild(button);
      }
    }
  });

  const sessions = (list, count) => {
    $("count").textContent = `(${count}${count > list.length ? ", the first " + list.length + " shown" : ""})`;
    rows("sessions", list, (tr, s) => {
      tr.dataset.session = s.id;
      cell(tr, s.id);
      cell(tr, s.service);
      cell(tr, s.peer || "-", "opt");
      cell(tr, s.age_s.toFixed(0) + "s", "num");
      cell(tr, size(s.bytes_in), "num");
      cell(tr, size(s.bytes_out), "num");
      cell(tr, s.waiting);
      cell(tr, String(s.pid), "num opt");
      cell(tr, s.cpu_s === null ? "-" : s.cpu_s.toFixed(1) + "s", "num opt");
      cell(tr, size(s.memory), "num opt");
      const td = cell(tr, "");
      if (control) {
        const button = document.createElement("button");
        button.textContent = "end";
        button.className = "end";
        button.onclick = () => post(`/sessions/${encodeURIComponent(s.id)}/end`);
        td.appendChild(button);
      }
    });
  };

  const guard = (g) => {
    const box = $("guard");
    if (!g || g.rss === undefined) { box.textContent = "no sample yet"; return; }
    const bar = (label, value, limit, high) => {
      const line = document.createElement("div");
      line.textContent = `${label}: ${size(value)} (${high ? "pauses above" : "pauses below"} ${size(limit)})`;
      const track = document.createElement("div"), fill = document.createElement("div"), mark = document.createElement("div");
      track.className = "bar"; fill.className = "fill"; mark.className = "mark";
      const scale = Math.max(value, limit) * 1.25 || 1;
      fill.style.width = (100 * value / scale) + "%";
      mark.style.left = (100 * limit / scale) + "%";
      track.append(fill, mark);
      box.append(line, track);
    };
    box.replaceChildren();
    const state = document.createElement("div");
    state.textContent = g.paused ? "accept held for memory" : "no pressure";
    state.className = g.paused ? "bad" : "good";
    box.appendChild(state);
    bar("gsrv's RSS", g.rss, g.max_rss, true);
    bar("available", g.available, g.min_available, false);
  };

  // Rates between consecutive samples of each counter, drawn as polylines on a 300x100 box.
  const rates = (history, key) => {
    const points = [];
    for (let i = 1; i < history.length; i++) {
      const dt = history[i].t - history[i - 1].t;
      const a = history[i - 1][key] || 0, b = history[i][key] || 0;
      if (dt > 0) points.push([history[i].t, Math.max(0, (b - a) / dt)]);
    }
    return points;
  };
  const plot = (id, lines) => {
    const svg = $(id), all = lines.flatMap((l) => l.points);
    svg.replaceChildren();
    if (all.length < 1) return;
    const t0 = Math.min(...all.map((p) => p[0])), t1 = Math.max(...all.map((p) => p[0]), t0 + 1);
    const top = Math.max(...all.map((p) => p[1]), 1e-9) * 1.1;
    for (const line of lines) {
      const poly = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
      poly.setAttribute("points", line.points.map(([t, v]) =>
        `${(300 * (t - t0) / (t1 - t0)).toFixed(1)},${(100 - 100 * v / top).toFixed(1)}`).join(" "));
      poly.setAttribute("stroke", line.color);
      svg.appendChild(poly);
    }
    const label = document.createElementNS("http://www.w3.org/2000/svg", "title");
    label.textContent = "highest: " + (top / 1.1).toPrecision(3);
    svg.appendChild(label);
  };
  const plots = (history) => {
    plot("plot-sessions", [{points: rates(history, "sessions"), color: COLORS[0]}]);
    plot("plot-bytes", [{points: rates(history, "bytes_in"), color: COLORS[0]}, {points: rates(history, "bytes_out"), color: COLORS[1]}]);
    plot("plot-blocked", [{points: rates(history, "blocked_in"), color: COLORS[0]}, {points: rates(history, "blocked_out"), color: COLORS[1]}]);
    const reasons = [...new Set(history.flatMap((h) => Object.keys(h).filter((k) => k.startsWith("refused:"))))];
    $("reasons").replaceChildren(...reasons.map((r, i) => {
      const span = document.createElement("span");
      span.textContent = " " + r.slice(8);
      span.style.color = COLORS[i % COLORS.length];
      return span;
    }));
    plot("plot-refused", reasons.map((r, i) => ({points: rates(history, r), color: COLORS[i % COLORS.length]})));
  };

  const post = async (path) => {
    const reply = await fetch(path, {method: "POST", headers: {...headers(), "Content-Type": "application/json"}, body: "{}"});
    if (!reply.ok) alert(`${path}: ${reply.status} ${(await reply.json()).error || ""}`);
    refresh();
  };

  const refresh = async () => {
    try {
      const reply = await fetch("status.json", {headers: headers()});
      if (reply.status === 401) {
        token = window.prompt("This gsrv's admin token ([admin] auth's file)") || "";
        sessionStorage.setItem("gsrv-admin-token", token);
        return;
      }
      const status = await reply.json();
      control = status.control;
      services(status.services);
      guard(status.guard);
      plots(status.history);
      sessions(status.sessions, status.count);
      window.gsrvDraws += 1;
      $("updated").textContent = "updated " + new Date().toLocaleTimeString() + (control ? "" : " (read-only)");
    } catch (error) {
      $("updated").textContent = "no answer: " + error;
    }
  };
  refresh();
  setInterval(refresh, 1000);
})();
