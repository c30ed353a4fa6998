// The job page: live progress from the job's event stream, then who said what, when. A job that
// is still a live stream (WS /v1/stream) is followed first: its finals drawn as they arrive, a lane
// per speaker, until the stream has become its job.
// Plain browser JavaScript, no build step, no outside resources. Every URL is relative to the
// page (/jobs/{id}/view), so the page also works behind a path prefix; every text from the job
// goes in through textContent, never as HTML.
"use strict";

(function () {
  const PALETTE = ["#2f6fdf", "#e4572e", "#17a398", "#c9900b", "#8e44ad", "#c0392b", "#34495e", "#27ae60",
    "#d35400", "#7f8c8d", "#1abc9c", "#e84393"];
  const EXPORTS = ["srt", "vtt", "rttm", "txt"];
  const SVG = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);
  // the page's words in the job's locale, put in the page by the shim (api_shim/page_text.py)
  const TEXT = JSON.parse(($("page-text") || {}).textContent || "{}");
  const tr = (key, values) => String(TEXT[key] ?? key).replace(/\{(\w+)\}/g, (_, k) => String((values || {})[k] ?? ""));
  const token = new URLSearchParams(location.search).get("token") || "";
  const auth = "?token=" + encodeURIComponent(token);
  const pathParts = location.pathname.split("/");
  const jobId = decodeURIComponent(pathParts[pathParts.length - 2] || "");
  let shownProgress = 0;
  let source = null;
  let done = false;

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function clock(t) {
    const m = Math.floor(t / 60);
    const s = t - 60 * m;
    return String(m).padStart(2, "0") + ":" + s.toFixed(1).padStart(4, "0");
  }

  function duration(t) {
    if (t < 60) return tr("seconds", { s: t.toFixed(1) });
    const m = Math.floor(t / 60);
    return tr("minutes", { m: m, s: Math.round(t - 60 * m) });
  }

  // --- progress -----------------------------------------------------------------------------

  function showState(state) {
    const status = state.status || "queued";
    $("status").textContent = TEXT["status." + status] || status;
    $("status").dataset.status = status;
    $("stage").textContent = state.stage ? tr("stage", { stage: state.stage }) : "";
    $("message").textContent = state.message || "";
    // progress never goes backwards on the page either (a late event, a reconnect)
    shownProgress = Math.max(shownProgress, Number(state.progress) || 0);
    $("progress").textContent = String(shownProgress);
    $("progress-fill").style.width = shownProgress + "%";
    $("progress-bar").setAttribute("aria-valuenow", String(shownProgress));
    document.body.dataset.status = status;
    if (status === "failed") {
      const err = $("error");
      err.hidden = false;
      err.textContent = (state.error_code ? state.error_code + ": " : "") + (state.error_message || tr("job_failed"));
    }
  }

  function addMilestone(event) {
    const li = el("li", { "data-progress": String(event.progress), "data-event-id": event.event_id || "" },
      event.progress + " % " + (event.message || event.status));
    $("milestones").appendChild(li);
  }

  function follow() {
    source = new EventSource("events" + auth);
    source.onmessage = (msg) => {
      const event = JSON.parse(msg.data);
      showState(event);
      addMilestone(event);
      if (event.status === "completed" || event.status === "failed") {
        source.close();
        done = true;
        if (event.status === "completed") {
          if (event.result) render(event.result);
          else load();
        }
      }
    };
    source.onerror = () => {
      // the browser reconnects by itself, sending Last-Event-ID; a closed stream after the end is expected
      if (done && source) source.close();
    };
  }

  async function load() {
    const resp = await fetch("view/data" + auth, { headers: { Accept: "application/json" } });
    if (!resp.ok) {
      let detail = resp.status + " " + resp.statusText;
      try { detail = (await resp.json()).detail || detail; } catch (e) { /* not JSON */ }
      showState({ status: "failed", progress: 0, message: "", error_message: String(detail) });
      return;
    }
    const data = await resp.json();
    showState(data.job);
    if (data.live) {
      followLive();
    } else if (data.job.status === "completed" && data.result) {
      done = true;
      render(data.result);
    } else if (data.job.status !== "failed" && !source) {
      follow();
    }
  }

  // --- a live stream, before it is a job (/view/live: the messages its WebSocket client gets) ---

  let liveSource = null;
  const liveFinals = new Map(); // final id -> the final, its speaker as the latest speaker_update says

  function followLive() {
    if (liveSource) return;
    document.body.dataset.live = "true";
    $("live-note").hidden = false;
    liveSource = new EventSource("view/live" + auth);
    liveSource.onmessage = (msg) => onLive(JSON.parse(msg.data));
    // on a dropped connection the browser reconnects by itself, resuming after the last message
  }

  function onLive(m) {
    if (m.type === "final") {
      liveFinals.set(m.id, m);
      showPartial("");
      drawLive();
    } else if (m.type === "speaker_update") {
      const f = liveFinals.get(m.id);
      if (f) { f.speaker = m.speaker; drawLive(); }
    } else if (m.type === "partial") {
      showPartial(m.text || "");
    } else if (m.type === "error") {
      const err = $("error");
      err.hidden = false;
      err.textContent = m.code + ": " + m.message;
    } else if (m.type === "end") {
      liveSource.close();
      liveSource = null;
      document.body.dataset.live = "false";
      $("live-note").hidden = true;
      showPartial("");
      if (m.job_id) load(); // the job the stream became: its progress, then its refined result
      else showState({ status: "failed", progress: 0, error_message: tr("live_ended") });
    }
  }

  function showPartial(text) {
    $("partial-text").textContent = text;
    $("partial").hidden = !text;
  }

  // the finals so far drawn as a result: the same lanes, talk time and transcript as a finished job's
  function drawLive() {
    const finals = Array.from(liveFinals.values()).sort((a, b) => a.id - b.id);
    const segments = finals.map((f) => ({ start: f.start, end: f.end, speaker: f.speaker || "?", text: f.text }));
    const stats = {};
    for (const f of finals) {
      const s = stats[f.speaker || "?"] ||= { total_duration: 0, segment_count: 0, word_count: 0 };
      s.total_duration += f.end - f.start;
      s.segment_count += 1;
      s.word_count += (f.words || []).length;
    }
    const result = { segments: segments, speakers: stats, metadata: { duration: Math.max(0, ...segments.map((x) => x.end)) } };
    const speakers = speakersOf(result);
    const colour = {};
    speakers.forEach((spk, i) => { colour[spk] = PALETTE[i % PALETTE.length]; });
    drawTimeline(result, speakers, colour);
    talkTime(result, speakers, colour);
    transcript(result, colour);
    $("result").hidden = false;
    document.body.dataset.liveFinals = String(finals.length);
  }

  // --- the result ---------------------------------------------------------------------------

  function speakersOf(result) {
    const names = new Set(Object.keys(result.speakers || {}));
    for (const t of result.diarization || []) names.add(t.speaker);
    for (const s of result.segments || []) if (s.speaker) names.add(s.speaker);
    return Array.from(names).sort();
  }

  // the display label: the enrolled name when the speaker was recognised (metadata.speakers), else the label
  let shownNames = {};
  function shown(spk) {
    return shownNames[spk] || spk;
  }

  function tickStep(total) {
    for (const step of [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600]) {
      if (total / step <= 12) return step;
    }
    return 7200;
  }

  function drawTimeline(result, speakers, colour) {
    const turns = (result.diarization && result.diarization.length) ? result.diarization : (result.segments || []);
    const meta = result.metadata || {};
    const end = Math.max(Number(meta.duration) || 0, ...turns.map((t) => t.end), 1);
    const W = 1100, left = 120, right = 28, laneH = 30, top = 8, axisH = 24;
    const H = top + laneH * speakers.length + axisH;
    const x = (t) => left + (W - left - right) * (t / end);
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": tr("timeline_label") });
    const step = tickStep(end);
    const axis = svg("g", { class: "axis-group" });
    for (let t = 0; t <= end + 1e-6; t += step) {
      axis.appendChild(svg("line", { class: "grid", x1: x(t), x2: x(t), y1: top, y2: H - axisH }));
      axis.appendChild(svg("text", { class: "axis", x: x(t), y: H - 8, "text-anchor": "middle" }, clock(t).replace(/\.0$/, "")));
    }
    root.appendChild(axis);
    speakers.forEach((spk, i) => {
      const y = top + i * laneH;
      const lane = svg("g", { class: "lane", "data-speaker": spk });
      lane.appendChild(svg("text", { class: "lane-label", x: 4, y: y + laneH / 2 + 4 }, shown(spk)));
      lane.appendChild(svg("rect", { x: left, y: y + 3, width: W - left - right, height: laneH - 6, fill: "#f3f5f7" }));
      for (const t of turns) {
        if (t.speaker !== spk) continue;
        const r = svg("rect", {
          class: "turn", x: x(t.start), y: y + 5, width: Math.max(1, x(t.end) - x(t.start)), height: laneH - 10,
          rx: 2, fill: colour[spk],
        });
        r.appendChild(svg("title", {}, `${shown(spk)} ${clock(t.start)}–${clock(t.end)}`));
        lane.appendChild(r);
      }
      root.appendChild(lane);
    });
    $("timeline").replaceChildren(root);
  }

  function talkTime(result, speakers, colour) {
    const stats = result.speakers || {};
    const total = speakers.reduce((a, s) => a + ((stats[s] || {}).total_duration || 0), 0) || 1;
    const rows = speakers.slice().sort((a, b) => ((stats[b] || {}).total_duration || 0) - ((stats[a] || {}).total_duration || 0));
    const body = $("talk-time").tBodies[0];
    body.replaceChildren();
    for (const spk of rows) {
      const s = stats[spk] || {};
      const tr = el("tr", { class: "talk", "data-speaker": spk });
      const name = el("td");
      const swatch = el("span", { class: "swatch" });
      swatch.style.background = colour[spk];
      name.append(swatch, document.createTextNode(shown(spk)));
      tr.append(name,
        el("td", { class: "num talk-seconds", "data-seconds": String(s.total_duration || 0) }, duration(s.total_duration || 0)),
        el("td", { class: "num" }, Math.round(100 * (s.total_duration || 0) / total) + " %"),
        el("td", { class: "num" }, String(s.segment_count ?? "")),
        el("td", { class: "num" }, String(s.word_count ?? "")));
      body.appendChild(tr);
    }
  }

  function downloads() {
    const list = $("downloads");
    list.replaceChildren();
    for (const fmt of EXPORTS) {
      const a = el("a", { href: `view/exports/${fmt}${auth}`, "data-format": fmt, download: `${jobId}.${fmt}` },
        tr("export." + fmt));
      const li = el("li");
      li.appendChild(a);
      list.appendChild(li);
    }
  }

  function transcript(result, colour) {
    const list = $("transcript");
    list.replaceChildren();
    for (const seg of result.segments || []) {
      const li = el("li", { class: "segment", "data-speaker": seg.speaker || "", "data-start": String(seg.start) });
      li.style.setProperty("--c", colour[seg.speaker] || "#999");
      li.append(el("span", { class: "time" }, clock(seg.start) + " – " + clock(seg.end)),
        el("span", { class: "who" }, seg.speaker_name || seg.speaker || "?"),
        el("span", { class: "text" }, (seg.text || "").trim()));
      list.appendChild(li);
    }
  }

  function render(result) {
    shownNames = (result.metadata || {}).speakers || {};
    const speakers = speakersOf(result);
    const colour = {};
    speakers.forEach((s, i) => { colour[s] = PALETTE[i % PALETTE.length]; });
    // the page speaks the job's locale; the transcript is marked with the language it is in
    const lang = (result.metadata || {}).language;
    if (lang) $("transcript").lang = lang;
    showState({ status: "completed", progress: 100, message: tr("done"), stage: "merge" });
    drawTimeline(result, speakers, colour);
    talkTime(result, speakers, colour);
    downloads();
    transcript(result, colour);
    $("result").hidden = false;
    document.body.dataset.rendered = "true";
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("job-id").textContent = jobId;
    document.title = tr("job_title", { job: jobId });
    load();
  });
})();
