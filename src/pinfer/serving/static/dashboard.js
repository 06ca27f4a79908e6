// The dashboard: polls GET /dashboard/stats (a server-side ring buffer, see web.py) every second.
"use strict";

const POLL_MS = 1000;
const $ = (id) => document.getElementById(id);
let paused = false; // while the key dialog waits for a key

function triple(p) {
  return p.count ? `${formatSeconds(p.p50)} / ${formatSeconds(p.p90)} / ${formatSeconds(p.p99)}` : "–";
}

function render(stats) {
  const c = stats.current;
  if (c) {
    $("v-running").textContent = c.running;
    $("v-waiting").textContent = c.waiting;
    $("v-kv").textContent = formatPercent(c.kv_cache_usage);
    $("v-prefix").textContent = formatPercent(c.prefix_cache_hit_rate);
    $("v-gen").textContent = c.generation_tokens_per_s.toFixed(1);
    $("v-prompt").textContent = c.prompt_tokens_per_s.toFixed(1);
    $("v-preempt").textContent = c.preemptions;
  }
  $("v-ttft").textContent = triple(stats.percentiles.ttft);
  $("v-tpot").textContent = triple(stats.percentiles.tpot);
  $("v-finished").textContent = stats.percentiles.e2e.count;
  $("updated").textContent = `updated ${new Date(stats.time * 1000).toLocaleTimeString()}`;

  const s = stats.series, r = stats.requests;
  const axis = { now: stats.time, window: stats.window_seconds };
  const count = (v) => (Number.isInteger(v) ? String(v) : v.toFixed(1));
  drawChart($("c-requests"), [
    { name: "running", color: "#2563eb", times: s.time, values: s.running },
    { name: "waiting", color: "#f59e0b", times: s.time, values: s.waiting },
  ], { ...axis, minYMax: 4, format: count });
  drawChart($("c-cache"), [
    { name: "KV cache used", color: "#7c3aed", times: s.time, values: s.kv_cache_usage },
    { name: "prefix-cache hit rate", color: "#10b981", times: s.time, values: s.prefix_cache_hit_rate },
  ], { ...axis, yMax: 1, format: (v) => `${Math.round(v * 100)}%` });
  drawChart($("c-tokens"), [
    { name: "generation", color: "#2563eb", times: s.time, values: s.generation_tokens_per_s },
    { name: "prompt", color: "#9ca3af", times: s.time, values: s.prompt_tokens_per_s },
  ], { ...axis, format: (v) => v.toFixed(0) });
  drawChart($("c-latency"), [
    { name: "TTFT", color: "#dc2626", times: r.time, values: r.ttft, dots: true },
    { name: "TPOT", color: "#2563eb", times: r.time, values: r.tpot, dots: true },
  ], { ...axis, format: formatSeconds });
}

async function poll() {
  if (!paused) {
    try {
      render(await api.json("/dashboard/stats"));
      $("error").hidden = true;
    } catch (error) {
      if (error instanceof AuthError) paused = true;
      else { $("error").textContent = `cannot read /dashboard/stats: ${error.message}`; $("error").hidden = false; }
    }
  }
  setTimeout(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  setUpKeyDialog();
  keyListeners.push(() => { paused = false; });
  poll();
});
