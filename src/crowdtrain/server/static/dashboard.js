// crowdtrain dashboard: polls GET /v1/dashboard every 2 s and draws the run.
// Plain JS, no framework, no build step. Every string from the server is untrusted (volunteer
// names!), so the DOM is built with createElement + textContent only, never innerHTML.
// Rounds are shown 1-based: "round k" is the round whose aggregate became model version k.
"use strict";

(() => {
  const POLL_MS = 2000;
  const FETCH_TIMEOUT_MS = 10000;
  const TOKEN_KEY = "crowdtrain.adminToken";
  const DEFAULT_BAN_REASON = "banned by the organizer";
  const MAX_MARKERS = 150;
  const SVG_NS = "http://www.w3.org/2000/svg";

  const state = {
    data: null, // last dashboard document
    receivedAt: 0, // performance.now() when it arrived
    inFlight: false,
    again: false, // a refresh was asked for while a poll was in flight
    timer: null,
    token: null, // admin token once validated
    lossAxis: "round",
    polls: 0,
  };

  const $ = (id) => document.getElementById(id);

  // ---- small DOM helpers ------------------------------------------------------------------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function svg(tag, attrs, parent) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (parent) parent.appendChild(node);
    return node;
  }

  function setText(id, text) {
    const node = $(id);
    if (node.textContent !== text) node.textContent = text;
  }

  function safeClass(s) {
    return String(s).toLowerCase().replace(/[^a-z0-9_-]/g, "");
  }

  // ---- formatting -------------------------------------------------------------------------

  const intFmt = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });

  function fmtInt(n) {
    return typeof n === "number" && isFinite(n) ? intFmt.format(n) : "–";
  }

  function fmtNum(n, digits) {
    return typeof n === "number" && isFinite(n) ? n.toFixed(digits) : "–";
  }

  function fmtBytes(n) {
    if (typeof n !== "number" || !isFinite(n)) return "–";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let i = 0;
    let v = Math.abs(n);
    while (v >= 1000 && i < units.length - 1) {
      v /= 1000;
      i += 1;
    }
    const digits = i === 0 || v >= 100 ? 0 : 1;
    return `${(Math.sign(n) * v).toFixed(digits)} ${units[i]}`;
  }

  function fmtAgo(seconds) {
    if (!isFinite(seconds)) return "never";
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return `${Math.floor(s / 86400)} d ago`;
  }

  function fmtClock(epoch) {
    const d = new Date(epoch * 1000);
    const two = (v) => String(v).padStart(2, "0");
    return `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`;
  }

  function fmtMinutes(m) {
    return `${fmtNum(m, m < 10 ? 1 : 0)} min`;
  }

  // Server time now, estimated from the last poll plus the local time since it arrived.
  function serverNow() {
    if (!state.data) return Date.now() / 1000;
    return state.data.now + (performance.now() - state.receivedAt) / 1000;
  }

  // ---- polling ----------------------------------------------------------------------------

  async function poll() {
    if (state.inFlight) {
      state.again = true;
      return;
    }
    state.inFlight = true;
    clearTimeout(state.timer);
    const abort = new AbortController();
    const timeout = setTimeout(() => abort.abort(), FETCH_TIMEOUT_MS);
    try {
      const known = state.data ? state.data.rounds : [];
      const since = known.length ? known[known.length - 1].version : null;
      const url = since === null ? "/v1/dashboard" : `/v1/dashboard?since=${since}`;
      const resp = await fetch(url, { cache: "no-store", signal: abort.signal });
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      const data = await resp.json();
      // After the first poll only new rounds come; a different run behind the same address
      // (another start time) makes the page start over with a full poll.
      if (typeof data.since === "number") {
        if (state.data.started_at !== data.started_at) {
          state.data = null;
          state.again = true;
          return;
        }
        data.rounds = known.concat(data.rounds || []);
      }
      state.data = data;
      state.receivedAt = performance.now();
      $("offline").hidden = true;
      render(data);
      state.polls += 1;
      document.body.dataset.polls = String(state.polls);
    } catch (_err) {
      $("offline").hidden = false;
    } finally {
      clearTimeout(timeout);
      state.inFlight = false;
      if (state.again) {
        state.again = false;
        setTimeout(poll, 0);
      } else {
        state.timer = setTimeout(poll, POLL_MS);
      }
    }
  }

  const refreshNow = () => poll();

  // ---- rendering --------------------------------------------------------------------------

  function render(d) {
    renderHeader(d);
    renderTotals(d.totals || {});
    renderCharts();
    renderVolunteers(d);
    renderLeaderboard(d.volunteers || []);
    renderRejections(d.rejections || []);
    renderSample(d.sample);
    renderAdminState(d);
    tick();
  }

  function runStatus(d) {
    if (d.finished) return "finished";
    return d.paused ? "paused" : "running";
  }

  function renderHeader(d) {
    setText("run-name", String(d.run ?? ""));
    document.title = `${d.run} · crowdtrain`;
    const status = runStatus(d);
    const badge = $("status");
    badge.textContent = status;
    badge.className = `badge ${status}`;
    setText("version", `v${fmtInt(d.version)}`);
    const r = d.round;
    if (r) {
      const shown = Math.min(r.number + 1, r.total);
      setText("round", d.finished ? `all ${fmtInt(r.total)} done` : `${shown} of ${fmtInt(r.total)}`);
      const assigned = r.assigned || [];
      const submitted = new Set(r.submitted || []);
      setText("quorum", `${submitted.size} of ${fmtInt(r.quorum)} needed`);
      $("quorum").classList.toggle("met", submitted.size >= r.quorum);
      setText("submitted-count", `${submitted.size} submitted of ${assigned.length} assigned`);
      const chips = $("participants");
      chips.replaceChildren();
      const names = [...assigned, ...[...submitted].filter((n) => !assigned.includes(n))];
      for (const name of names) {
        const done = submitted.has(name);
        const chip = el("span", `chip ${done ? "submitted" : "pending"}`, name);
        chip.title = done ? "contribution received" : "working";
        chips.appendChild(chip);
      }
    } else {
      setText("round", "–");
      setText("quorum", "–");
    }
  }

  function tick() {
    const d = state.data;
    if (!d) return;
    const countdown = $("countdown");
    if (d.finished || !d.round) {
      countdown.textContent = "run finished";
    } else {
      // While paused the round clock is stopped: show the time left as of the last poll.
      const now = d.paused ? d.now : serverNow();
      const left = Math.ceil(d.round.deadline - now);
      countdown.textContent =
        left > 0 ? `${left} s left${d.paused ? " (paused)" : ""}` : "past deadline, waiting for quorum";
      countdown.classList.toggle("late", left <= 0);
    }
    const now = serverNow();
    for (const cell of document.querySelectorAll("#volunteers td.last-seen")) {
      const t = Number(cell.dataset.t);
      const text = cell.dataset.t ? fmtAgo(now - t) : "never";
      if (cell.textContent !== text) cell.textContent = text;
    }
  }

  function renderTotals(t) {
    setText("total-samples", fmtInt(t.samples));
    setText("total-accepted", fmtInt(t.contributions_accepted));
    setText("total-rejected",
      `${fmtInt(t.contributions_rejected)} / ${fmtInt(t.contributions_flagged || 0)}`);
    setText("total-bytes-in", fmtBytes(t.bytes_in));
    setText("total-bytes-out", fmtBytes(t.bytes_out));
  }

  // Volunteer rows are kept (keyed by peer id) so a ban reason being typed survives a poll.
  const COLUMNS = ["name", "device", "samples", "accepted", "rejected", "flagged", "reputation",
    "strikes",
    "online", "last-seen", "banned", "actions"];
  const NUMERIC = ["samples", "accepted", "rejected", "flagged", "reputation", "strikes"];
  const rows = new Map();

  function renderVolunteers(d) {
    const tbody = $("volunteers").tBodies[0];
    const list = d.volunteers || [];
    const seen = new Set();
    list.forEach((v, i) => {
      const id = String(v.peer_id);
      seen.add(id);
      let row = rows.get(id);
      if (!row) {
        row = el("tr");
        row.dataset.peer = id;
        for (const c of COLUMNS) {
          const num = NUMERIC.includes(c);
          const cls = c === "actions" ? "actions admin-only" : c;
          row.appendChild(el("td", num ? `${cls} num` : cls));
        }
        rows.set(id, row);
      }
      updateRow(row, v);
      if (tbody.children[i] !== row) tbody.insertBefore(row, tbody.children[i] || null);
    });
    for (const [id, row] of rows) {
      if (!seen.has(id)) {
        row.remove();
        rows.delete(id);
      }
    }
    $("volunteers-empty").hidden = list.length > 0;
  }

  function updateRow(row, v) {
    const cell = (c) => row.children[COLUMNS.indexOf(c)];
    const put = (c, text) => {
      if (cell(c).textContent !== text) cell(c).textContent = text;
    };
    put("name", String(v.name));
    cell("name").title = String(v.peer_id);
    put("device", String(v.device ?? ""));
    put("samples", fmtInt(v.samples));
    put("accepted", fmtInt(v.accepted));
    put("rejected", fmtInt(v.rejected));
    put("flagged", fmtInt(v.flagged ?? 0));
    put("reputation", fmtNum(v.reputation, 2));
    put("strikes", Number.isInteger(v.strikes) ? fmtInt(v.strikes) : fmtNum(v.strikes, 1));
    const online = cell("online");
    if (online.dataset.on !== String(Boolean(v.online))) {
      online.dataset.on = String(Boolean(v.online));
      online.replaceChildren(el("span", `dot ${v.online ? "on" : "off"}`),
        document.createTextNode(v.online ? "online" : "offline"));
    }
    const lastSeen = cell("last-seen");
    if (typeof v.last_seen === "number") lastSeen.dataset.t = String(v.last_seen);
    else delete lastSeen.dataset.t;
    const banned = cell("banned");
    const banKey = v.banned ? `yes:${v.ban_reason}` : "no";
    if (banned.dataset.key !== banKey) {
      banned.dataset.key = banKey;
      banned.replaceChildren();
      if (v.banned) {
        banned.appendChild(el("span", "tag bad", "banned"));
        if (v.ban_reason) banned.appendChild(el("span", "reason", String(v.ban_reason)));
      }
    }
    row.classList.toggle("is-banned", Boolean(v.banned));
    row.classList.toggle("is-offline", !v.online);
    const actions = cell("actions");
    const actKey = `${state.token ? "admin" : "public"}:${Boolean(v.banned)}`;
    if (actions.dataset.key !== actKey) {
      actions.dataset.key = actKey;
      actions.replaceChildren();
      if (state.token) actions.appendChild(banControls(String(v.peer_id), String(v.name), v.banned));
    }
  }

  function banControls(peerId, name, banned) {
    const box = el("div", "ban-controls");
    if (banned) {
      const btn = el("button", "unban", "Unban");
      btn.type = "button";
      btn.addEventListener("click", () =>
        adminAction(btn, "POST", `/v1/admin/peers/${encodeURIComponent(peerId)}/unban`, {},
          () => `Unbanned ${name}.`));
      box.appendChild(btn);
    } else {
      const reason = el("input", "ban-reason");
      reason.type = "text";
      reason.value = DEFAULT_BAN_REASON;
      reason.maxLength = 200;
      reason.setAttribute("aria-label", `reason for banning ${name}`);
      const btn = el("button", "ban", "Ban");
      btn.type = "button";
      btn.addEventListener("click", () => {
        const why = reason.value.trim() || DEFAULT_BAN_REASON;
        adminAction(btn, "POST", `/v1/admin/peers/${encodeURIComponent(peerId)}/ban`,
          { reason: why }, () => `Banned ${name}.`);
      });
      box.append(reason, btn);
    }
    return box;
  }

  function renderLeaderboard(volunteers) {
    const top = [...volunteers]
      .sort((a, b) => (b.samples || 0) - (a.samples || 0) || String(a.name).localeCompare(String(b.name)))
      .slice(0, 10);
    const max = top.reduce((m, v) => Math.max(m, v.samples || 0), 1);
    const ol = $("leaderboard");
    ol.replaceChildren();
    for (const v of top) {
      const li = el("li");
      li.dataset.peer = String(v.peer_id);
      const head = el("div", "lb-head");
      head.append(el("span", "lb-name", String(v.name)), el("span", "lb-samples", fmtInt(v.samples)));
      const track = el("div", "lb-track");
      const bar = el("div", "lb-bar");
      bar.style.width = `${(100 * (v.samples || 0)) / max}%`;
      track.appendChild(bar);
      li.append(head, track);
      ol.appendChild(li);
    }
  }

  function renderRejections(list) {
    const tbody = $("rejections").tBodies[0];
    tbody.replaceChildren();
    for (const r of [...list].reverse()) {
      const tr = el("tr");
      tr.append(el("td", "time", fmtClock(r.time)));
      const who = el("td", "peer", String(r.peer ?? r.peer_id ?? ""));
      who.title = String(r.peer_id ?? "");
      tr.append(who, el("td", "num", typeof r.round === "number" ? fmtInt(r.round + 1) : "–"));
      tr.append(el("td", "stage", String(r.stage ?? "")));
      const outcome = el("td", "outcome");
      outcome.appendChild(el("span", `tag ${safeClass(r.outcome)}`, String(r.outcome ?? "")));
      tr.append(outcome, el("td", "reason", String(r.reason ?? "")));
      tbody.appendChild(tr);
    }
    $("rejections-empty").hidden = list.length > 0;
  }

  function renderSample(sample) {
    const pre = $("sample");
    if (!sample) {
      setText("sample-caption", "No sample yet.");
      pre.replaceChildren();
      return;
    }
    const caption = `model v${fmtInt(sample.version)} says:`;
    const key = `${sample.version}\u0000${sample.prompt}\u0000${sample.text}`;
    if (pre.dataset.key === key) return;
    pre.dataset.key = key;
    setText("sample-caption", caption);
    pre.replaceChildren(el("span", "prompt", String(sample.prompt ?? "")),
      document.createTextNode(String(sample.text ?? "")));
  }

  // ---- charts -----------------------------------------------------------------------------

  function renderCharts() {
    const d = state.data;
    if (!d) return;
    const t0 = d.started_at;
    const rounds = d.rounds || [];
    const byTime = state.lossAxis === "time";
    const x = (r) => (byTime ? (r.time - t0) / 60 : r.round + 1);
    const xName = (xv) => (byTime ? fmtMinutes(xv) : `round ${xv}`);
    const evalPts = [];
    if (typeof d.initial_eval_loss === "number") evalPts.push([0, d.initial_eval_loss, "v0"]);
    const trainPts = [];
    for (const r of rounds) {
      if (typeof r.eval_loss === "number") evalPts.push([x(r), r.eval_loss, `v${r.version}`]);
      if (typeof r.train_loss === "number") trainPts.push([x(r), r.train_loss, `v${r.version}`]);
    }
    drawChart($("loss-chart"), {
      integerX: !byTime,
      xMin: 0,
      xLabel: byTime ? "minutes since start" : "after round",
      yFormat: (v) => fmtNum(v, 2),
      series: [
        { cls: "train", points: trainPts, tip: (p) => `${xName(p[0])}: train loss ${fmtNum(p[1], 3)}` },
        { cls: "eval", points: evalPts, tip: (p) => `${xName(p[0])}: eval loss ${fmtNum(p[1], 3)} (${p[2]})` },
      ],
    });

    const peers = (d.peers_online || []).map(([t, n]) => [(t - t0) / 60, n]);
    drawChart($("peers-chart"), {
      xLabel: "minutes since start",
      xMin: 0,
      yMin: 0,
      integerY: true,
      yFormat: (v) => fmtInt(v),
      series: [{ cls: "peers", step: true, points: peers,
        tip: (p) => `${fmtMinutes(p[0])}: ${fmtInt(p[1])} online` }],
    });

    const bw = d.bandwidth || [];
    drawChart($("bandwidth-chart"), {
      xLabel: "minutes since start",
      xMin: 0,
      yMin: 0,
      yFormat: (v) => `${fmtBytes(v)}/s`,
      series: [
        { cls: "bw-in", points: bw.map(([t, i]) => [(t - t0) / 60, i]),
          tip: (p) => `${fmtMinutes(p[0])}: in ${fmtBytes(p[1])}/s` },
        { cls: "bw-out", points: bw.map(([t, , o]) => [(t - t0) / 60, o]),
          tip: (p) => `${fmtMinutes(p[0])}: out ${fmtBytes(p[1])}/s` },
      ],
    });

    const util = rounds.filter((r) => typeof r.compute_utilization === "number")
      .map((r) => [r.round + 1, 100 * r.compute_utilization]);
    drawChart($("utilization-chart"), {
      xLabel: "round",
      integerX: true,
      bars: true,
      yMin: 0,
      yMax: 100,
      yFormat: (v) => `${fmtInt(v)}%`,
      series: [{ cls: "util", points: util,
        tip: (p) => `round ${p[0]}: ${fmtNum(p[1], 0)}% of the volunteers' time spent computing` }],
    });
  }

  // A round step (1, 2 or 5 times a power of ten) giving about `count` intervals on [lo, hi].
  function niceStep(lo, hi, count, integer) {
    const raw = (hi - lo) / Math.max(1, count);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || 10 * mag;
    return integer ? Math.max(1, Math.round(step)) : step;
  }

  function niceTicks(lo, hi, step) {
    const ticks = [];
    for (let v = Math.ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step) {
      ticks.push(Math.abs(v) < step * 1e-9 ? 0 : v);
    }
    return ticks;
  }

  // [min, max] of the values (or the fixed bounds lo / hi), never empty.
  function extent(values, lo, hi) {
    let min = Infinity;
    let max = -Infinity;
    for (const v of values) {
      if (v < min) min = v;
      if (v > max) max = v;
    }
    if (lo !== undefined) min = lo;
    if (hi !== undefined) max = hi;
    if (!isFinite(min) || !isFinite(max)) return [0, 1];
    if (max - min < 1e-12) {
      const pad = Math.abs(max) > 0 ? Math.abs(max) * 0.1 : 1;
      if (lo === undefined) min -= pad;
      if (hi === undefined || max === min) max += pad;
    }
    return [min, max];
  }

  // Evenly spaced subset of at most `limit` points, always keeping the first and last.
  function thin(points, limit) {
    if (points.length <= limit) return points;
    const out = [];
    for (let i = 0; i < limit; i += 1) out.push(points[Math.round((i * (points.length - 1)) / (limit - 1))]);
    return out;
  }

  function drawChart(node, opts) {
    const width = Math.max(200, node.clientWidth || 600);
    const height = Math.max(120, node.clientHeight || 220);
    node.setAttribute("viewBox", `0 0 ${width} ${height}`);
    node.replaceChildren();
    const m = { top: 12, right: 14, bottom: 36, left: 62 };
    const w = width - m.left - m.right;
    const h = height - m.top - m.bottom;
    const all = opts.series.flatMap((s) => s.points);
    if (all.length === 0) {
      svg("text", { x: width / 2, y: height / 2, class: "empty", "text-anchor": "middle" }, node)
        .textContent = "no data yet";
      return;
    }
    const xs = all.map((p) => p[0]);
    if (opts.xMin !== undefined) xs.push(opts.xMin);
    let [x0, x1] = extent(xs);
    if (opts.xMin !== undefined) x0 = Math.max(x0, opts.xMin);
    if (opts.bars) {
      x0 -= 0.5;
      x1 += 0.5;
    }
    const yVals = all.map((p) => p[1]);
    let [y0, y1] = extent(yVals, opts.yMin, opts.yMax);
    const yStep = niceStep(y0, y1, 4, opts.integerY);
    // Free ends of the y axis widen to the next round tick.
    if (opts.yMax === undefined) y1 = Math.ceil(y1 / yStep - 1e-9) * yStep;
    if (opts.yMin === undefined) y0 = Math.floor(y0 / yStep + 1e-9) * yStep;
    const sx = (v) => m.left + ((v - x0) / (x1 - x0)) * w;
    const sy = (v) => m.top + h - ((v - y0) / (y1 - y0)) * h;

    const axes = svg("g", { class: "axes" }, node);
    for (const v of niceTicks(y0, y1, yStep)) {
      svg("line", { x1: m.left, x2: m.left + w, y1: sy(v), y2: sy(v), class: "grid" }, axes);
      svg("text", { x: m.left - 6, y: sy(v) + 4, "text-anchor": "end", class: "tick" }, axes)
        .textContent = opts.yFormat(v);
    }
    const xStep = niceStep(x0, x1, Math.max(2, Math.floor(w / 90)), opts.integerX);
    const xTicks = niceTicks(x0, x1, xStep);
    const xDigits = xStep >= 1 ? 0 : Math.min(3, Math.ceil(-Math.log10(xStep) - 1e-9));
    for (const v of xTicks) {
      svg("line", { x1: sx(v), x2: sx(v), y1: m.top + h, y2: m.top + h + 4, class: "axis" }, axes);
      svg("text", { x: sx(v), y: m.top + h + 16, "text-anchor": "middle", class: "tick" }, axes)
        .textContent = fmtNum(v, xDigits);
    }
    svg("line", { x1: m.left, x2: m.left + w, y1: m.top + h, y2: m.top + h, class: "axis" }, axes);
    svg("line", { x1: m.left, x2: m.left, y1: m.top, y2: m.top + h, class: "axis" }, axes);
    svg("text", { x: m.left + w / 2, y: height - 4, "text-anchor": "middle", class: "label" }, axes)
      .textContent = opts.xLabel;

    for (const s of opts.series) {
      const g = svg("g", { class: `series ${s.cls}` }, node);
      if (s.points.length === 0) continue;
      if (opts.bars) {
        const bw = Math.max(2, Math.min(28, (w / (x1 - x0)) * 0.6));
        for (const p of s.points) {
          svg("rect", { class: "bar", x: sx(p[0]) - bw / 2, y: sy(p[1]), width: bw,
            height: Math.max(0, sy(y0) - sy(p[1])) }, g);
        }
      } else {
        let d = `M${sx(s.points[0][0])},${sy(s.points[0][1])}`;
        for (const p of s.points.slice(1)) {
          d += s.step ? `H${sx(p[0])}V${sy(p[1])}` : `L${sx(p[0])},${sy(p[1])}`;
        }
        svg("path", { d, class: "line" }, g);
      }
      for (const p of thin(s.points, MAX_MARKERS)) {
        const dot = svg("circle", { class: "point", cx: sx(p[0]), cy: sy(p[1]), r: opts.bars ? 2.5 : 3 }, g);
        svg("title", {}, dot).textContent = s.tip(p);
      }
    }
  }

  // ---- admin ------------------------------------------------------------------------------

  function storedToken() {
    try {
      return sessionStorage.getItem(TOKEN_KEY);
    } catch (_err) {
      return null;
    }
  }

  function storeToken(token) {
    try {
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch (_err) {
      // Storage can be unavailable (private modes); the token then lasts for this page only.
    }
  }

  function say(text, ok) {
    const msg = $("admin-message");
    msg.textContent = text;
    msg.className = ok ? "ok" : "error";
  }

  async function request(method, path, body) {
    const headers = { Authorization: `Bearer ${state.token}` };
    const init = { method, headers, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const resp = await fetch(path, init);
    let doc = null;
    try {
      doc = await resp.json();
    } catch (_err) {
      doc = null;
    }
    return { status: resp.status, ok: resp.ok, doc };
  }

  function problemText(res) {
    if (res.doc && typeof res.doc.detail === "string" && res.doc.detail) return res.doc.detail;
    return `The coordinator answered with HTTP status ${res.status}.`;
  }

  async function login(token, quiet) {
    state.token = token;
    let res;
    try {
      res = await request("GET", "/v1/admin/check");
    } catch (_err) {
      state.token = null;
      say("Could not reach the coordinator to check the token; try again.", false);
      return;
    }
    if (res.ok) {
      storeToken(token);
      $("admin-token").value = "";
      if (!quiet) say("Signed in as the organizer.", true);
    } else {
      state.token = null;
      storeToken(null);
      say(res.status === 401 ? "That admin token was not accepted." : problemText(res), false);
    }
    applyAdmin();
  }

  function logout() {
    state.token = null;
    storeToken(null);
    say("Signed out.", true);
    applyAdmin();
  }

  function applyAdmin() {
    const admin = Boolean(state.token);
    document.body.classList.toggle("admin", admin);
    $("admin-controls").hidden = !admin;
    $("admin-login-form").hidden = admin;
    if (state.data) {
      renderVolunteers(state.data);
      renderAdminState(state.data);
    }
  }

  function renderAdminState(d) {
    $("pause-btn").disabled = Boolean(d.paused || d.finished);
    $("resume-btn").disabled = !d.paused || Boolean(d.finished);
  }

  async function adminAction(button, method, path, body, success) {
    if (!state.token) return;
    if (button) button.disabled = true;
    try {
      const res = await request(method, path, body);
      if (res.ok) {
        say(success(res.doc || {}), true);
      } else if (res.status === 401) {
        state.token = null;
        storeToken(null);
        applyAdmin();
        say("The admin token is no longer accepted; sign in again.", false);
      } else {
        say(problemText(res), false);
      }
    } catch (_err) {
      say("Could not reach the coordinator; the action may not have happened.", false);
    } finally {
      if (button && button.isConnected) button.disabled = false;
      refreshNow();
    }
  }

  function setDeadline(event) {
    event.preventDefault();
    const secs = Number($("deadline-in").value);
    if (!(secs > 0)) {
      say("Enter the number of seconds until this round closes (more than 0).", false);
      return;
    }
    const body = { deadline_in: secs };
    const later = $("round-seconds").value.trim();
    if (later !== "") {
      const v = Number(later);
      if (!(v > 0)) {
        say("The length of later rounds must be a number of seconds above 0.", false);
        return;
      }
      body.round_seconds = v;
    }
    adminAction($("deadline-btn"), "POST", "/v1/admin/deadline", body, (doc) =>
      typeof doc.deadline === "number"
        ? `Deadline moved: this round closes at ${fmtClock(doc.deadline)}.`
        : "Deadline moved.");
  }

  // ---- start ------------------------------------------------------------------------------

  function init() {
    $("loss-vs-round").addEventListener("click", () => setLossAxis("round"));
    $("loss-vs-time").addEventListener("click", () => setLossAxis("time"));
    $("admin-login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("admin-token").value.trim();
      if (token) login(token, false);
      else say("Paste the admin token printed by `crowdtrain serve`.", false);
    });
    $("admin-logout").addEventListener("click", logout);
    $("pause-btn").addEventListener("click", (e) =>
      adminAction(e.currentTarget, "POST", "/v1/admin/pause", {}, () => "Run paused."));
    $("resume-btn").addEventListener("click", (e) =>
      adminAction(e.currentTarget, "POST", "/v1/admin/resume", {}, () => "Run resumed."));
    $("deadline-form").addEventListener("submit", setDeadline);
    let pending = false;
    window.addEventListener("resize", () => {
      if (pending) return;
      pending = true;
      requestAnimationFrame(() => {
        pending = false;
        renderCharts();
      });
    });

    window.addEventListener("hashchange", () => {
      const token = tokenFromFragment();
      if (token) login(token, false);
    });
    const fromUrl = tokenFromFragment();
    const token = fromUrl || storedToken();
    if (token) login(token, !fromUrl);
    else applyAdmin();
    setInterval(tick, 1000);
    poll();
  }

  // A token handed over as https://host/#admin=<token>; the fragment is then removed from the
  // address bar (and history) so it is not left on screen or bookmarked.
  function tokenFromFragment() {
    const match = /^#admin=(.+)$/.exec(window.location.hash);
    if (!match) return null;
    history.replaceState(null, "", window.location.pathname + window.location.search);
    try {
      return decodeURIComponent(match[1]);
    } catch (_err) {
      say("The admin token in the address is malformed; paste it into the box instead.", false);
      return null;
    }
  }

  function setLossAxis(axis) {
    state.lossAxis = axis;
    $("loss-vs-round").setAttribute("aria-pressed", String(axis === "round"));
    $("loss-vs-time").setAttribute("aria-pressed", String(axis === "time"));
    renderCharts();
  }

  init();
})();
