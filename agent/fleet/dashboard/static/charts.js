// Small line charts on a canvas: a few series of [time, value] points, time on x, shared y scale.
"use strict";

const PALETTE = ["#2f7ed8", "#e4572e", "#17a673", "#a05eb5", "#f0a202", "#6c757d"];

function drawChart(canvas, series, windowS) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = {l: 34, r: 6, t: 6, b: 16};
  ctx.clearRect(0, 0, w, h);
  const now = Date.now() / 1000;
  const t0 = now - windowS;
  let lo = Infinity, hi = -Infinity;
  for (const s of series) {
    for (const [t, v] of s.points) {
      if (t >= t0 && v !== null && v !== undefined) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    }
  }
  ctx.font = "10px sans-serif";
  ctx.fillStyle = "#888";
  if (lo === Infinity) { ctx.fillText("no data yet", w / 2 - 25, h / 2); return; }
  if (lo > 0) lo = 0;
  if (hi === lo) hi = lo + 1;
  const x = t => pad.l + (t - t0) / windowS * (w - pad.l - pad.r);
  const y = v => h - pad.b - (v - lo) / (hi - lo) * (h - pad.t - pad.b);
  ctx.strokeStyle = "#ddd";
  ctx.beginPath();
  for (const v of [lo, (lo + hi) / 2, hi]) { ctx.moveTo(pad.l, y(v)); ctx.lineTo(w - pad.r, y(v)); }
  ctx.stroke();
  for (const v of [lo, (lo + hi) / 2, hi]) ctx.fillText(v.toFixed(hi - lo < 10 ? 1 : 0), 2, y(v) + 3);
  ctx.fillText(windowS >= 120 ? `-${Math.round(windowS / 60)} min` : `-${Math.round(windowS)} s`, pad.l, h - 3);
  ctx.fillText("now", w - pad.r - 18, h - 3);
  series.forEach((s, i) => {
    ctx.strokeStyle = s.color || PALETTE[i % PALETTE.length];
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    let pen = false;
    for (const [t, v] of s.points) {
      if (t < t0 || v === null || v === undefined) { pen = false; continue; }
      if (pen) ctx.lineTo(x(t), y(v)); else ctx.moveTo(x(t), y(v));
      pen = true;
    }
    ctx.stroke();
  });
  let lx = pad.l + 4;
  series.forEach((s, i) => {
    ctx.fillStyle = s.color || PALETTE[i % PALETTE.length];
    ctx.fillText(s.label, lx, pad.t + 9);
    lx += ctx.measureText(s.label).width + 10;
  });
}

// A result's snapshot as the device sent it: the device draws the boxes and labels into the JPEG itself
// (agent/vision/snapshot.py), so drawing them again here would double them.
function drawSnapshot(canvas, result) {
  const img = new Image();
  img.onload = () => {
    canvas.width = img.width; canvas.height = img.height;
    canvas.getContext("2d").drawImage(img, 0, 0);
    canvas.title = (result.detections || []).map(d => `${d.label} ${(d.score || 0).toFixed(2)}`).join(", ");
  };
  img.src = `data:${result.snapshot.type || "image/jpeg"};base64,${result.snapshot.b64}`;
}

window.drawChart = drawChart;
window.drawSnapshot = drawSnapshot;
