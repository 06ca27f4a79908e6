// A small canvas time-series chart: lines and/or dots over the last `window` seconds.
// Enough for the dashboard; no chart library needed.
"use strict";

const CHART_FONT = "11px system-ui, sans-serif";

// series: [{name, color, times, values, dots?}]; options: {now, window, yMax? (else fitted, at least
// minYMax), format(y)}
function drawChart(canvas, series, options) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
  if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.font = CHART_FONT;

  const pad = { left: 52, right: 10, top: 22, bottom: 20 };
  const plotW = width - pad.left - pad.right, plotH = height - pad.top - pad.bottom;
  const t0 = options.now - options.window;
  let yMax = options.yMax;
  if (yMax === undefined) {
    const all = series.flatMap((s) => s.values.filter((v) => v !== null && Number.isFinite(v)));
    yMax = niceCeiling(Math.max(options.minYMax || 1e-9, ...all));
  }
  const x = (t) => pad.left + ((t - t0) / options.window) * plotW;
  const y = (v) => pad.top + plotH - (Math.min(v, yMax) / yMax) * plotH;

  // grid and axes
  ctx.strokeStyle = "#e5e7eb";
  ctx.fillStyle = "#6b7280";
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let i = 0; i <= 4; i++) {
    const v = (yMax * i) / 4, yy = Math.round(y(v)) + 0.5;
    ctx.beginPath(); ctx.moveTo(pad.left, yy); ctx.lineTo(pad.left + plotW, yy); ctx.stroke();
    ctx.fillText(options.format(v), pad.left - 6, yy);
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (let m = 0; m <= options.window / 60; m++) {
    const xx = x(options.now - m * 60);
    ctx.fillText(m === 0 ? "now" : `-${m}m`, xx, pad.top + plotH + 5);
  }

  // data
  let points = 0;
  for (const s of series) {
    ctx.strokeStyle = s.color;
    ctx.fillStyle = s.color;
    ctx.lineWidth = 1.8;
    if (s.dots) {
      s.times.forEach((t, i) => {
        if (s.values[i] === null || t < t0) return;
        ctx.beginPath(); ctx.arc(x(t), y(s.values[i]), 2.6, 0, 2 * Math.PI); ctx.fill();
        points++;
      });
    } else {
      ctx.beginPath();
      let started = false;
      s.times.forEach((t, i) => {
        if (s.values[i] === null || t < t0) return;
        if (started) ctx.lineTo(x(t), y(s.values[i])); else { ctx.moveTo(x(t), y(s.values[i])); started = true; }
        points++;
      });
      ctx.stroke();
    }
  }
  canvas.dataset.points = String(points); // for tests and the curious

  // legend
  ctx.textAlign = "left";
  ctx.textBaseline = "middle";
  let lx = pad.left;
  for (const s of series) {
    ctx.fillStyle = s.color;
    ctx.fillRect(lx, 8, 10, 3);
    ctx.fillStyle = "#374151";
    ctx.fillText(s.name, lx + 14, 10);
    lx += 24 + ctx.measureText(s.name).width;
  }
}

// 1, 2, 4, 8 x 10^k at or above v: four grid steps of round values.
function niceCeiling(v) {
  const step = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 4, 8, 10]) if (m * step >= v) return m * step;
  return 10 * step;
}
