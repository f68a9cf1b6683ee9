// Polls /dashboard/data (the server's ring buffer of the last hour) and draws four uPlot
// charts. Each chart's container carries data-points = the number of points it shows.
"use strict";

(function () {
  const CHART_HEIGHT = 240;
  const MIN_POLL_SECONDS = 1;
  const MAX_POLL_SECONDS = 5;

  const seconds = (v) => {
    if (v == null) return "—";
    if (v < 1) return `${(v * 1000).toFixed(0)} ms`;
    return `${Number.isInteger(v) ? v : v.toFixed(2)} s`;
  };
  const rate = (v) => (v == null ? "—" : v >= 100 || Number.isInteger(v) ? v.toFixed(0) : v.toFixed(1));
  const percent = (v) => (v == null ? "—" : `${(v * 100).toFixed(1)} %`);
  const bytes = (v) => {
    if (v == null) return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(v) >= 1024 && i < units.length - 1) {
      v /= 1024;
      i += 1;
    }
    return `${v.toFixed(v >= 10 || i === 0 ? 0 : 1)} ${units[i]}`;
  };

  // Byte axes step in powers of two (128 MiB, 256 MiB, …), not in powers of ten.
  const POWERS_OF_TWO = Array.from({ length: 51 }, (_, i) => 2 ** i);

  // Zero-based y ranges: a flat line near zero should look near zero.
  const fromZero = (u, min, max) => [0, max > 0 ? max * 1.1 : 1];

  // Percentiles are null in idle intervals: those stay gaps, and a lone reading between two
  // gaps gets a dot, or it would not show at all.
  const loneReadings = (u, seriesIdx, show) => {
    if (show) return null;
    const ys = u.data[seriesIdx];
    const idxs = [];
    for (let i = 0; i < ys.length; i++) {
      if (ys[i] != null && ys[i - 1] == null && ys[i + 1] == null) idxs.push(i);
    }
    return idxs.length ? idxs : null;
  };
  const percentile = { points: { filter: loneReadings } };

  const line = (label, field, stroke, extra) =>
    Object.assign({ label, field, stroke, width: 2 }, extra);

  const CHARTS = [
    {
      id: "latency",
      format: seconds,
      series: [
        line("TTFT p50", "ttft_p50", "#54aeff", percentile),
        line("TTFT p99", "ttft_p99", "#0550ae", percentile),
        line("end-to-end p50", "e2e_p50", "#fb8f44", percentile),
        line("end-to-end p99", "e2e_p99", "#bc4c00", percentile),
      ],
      latest: (p) => `p99 TTFT ${seconds(p.ttft_p99)} · p99 end-to-end ${seconds(p.e2e_p99)}`,
    },
    {
      id: "throughput",
      format: rate,
      series: [
        line("generated tokens/s", "tokens_per_second", "#1a7f37", { fill: "rgba(26,127,55,0.08)" }),
        line("requests/s", "requests_per_second", "#8250df", { scale: "rps", dash: [6, 4] }),
      ],
      rightAxis: { scale: "rps", label: "requests/s" },
      latest: (p) => `${rate(p.tokens_per_second)} tok/s · ${rate(p.requests_per_second)} req/s`,
    },
    {
      id: "memory",
      format: bytes,
      incrs: POWERS_OF_TWO,
      series: [line("API + engine", "memory_bytes", "#cf222e", { fill: "rgba(207,34,46,0.08)" })],
      latest: (p) => bytes(p.memory_bytes),
    },
    {
      id: "kv",
      format: percent,
      range: [0, 1],
      series: [line("KV blocks in use", "kv_usage", "#9a6700", { fill: "rgba(154,103,0,0.10)" })],
      latest: (p) => percent(p.kv_usage),
    },
  ];

  function axes(chart) {
    const left = {
      size: 70,
      values: (u, splits) => splits.map(chart.format),
      grid: { stroke: "#eaeef2" },
    };
    if (chart.incrs) left.incrs = chart.incrs;
    const list = [{ grid: { stroke: "#eaeef2" } }, left];
    if (chart.rightAxis) {
      list.push({
        scale: chart.rightAxis.scale,
        side: 1,
        size: 50,
        values: (u, splits) => splits.map(rate),
        grid: { show: false },
      });
    }
    return list;
  }

  function create(chart) {
    const container = document.getElementById(`${chart.id}-chart`);
    const scales = { x: { time: true }, y: { range: chart.range || fromZero } };
    if (chart.rightAxis) scales[chart.rightAxis.scale] = { range: fromZero };
    const options = {
      width: container.clientWidth,
      height: CHART_HEIGHT,
      scales,
      axes: axes(chart),
      legend: { live: false },
      series: [{}].concat(chart.series.map(({ field, ...s }) => s)),
    };
    const empty = [[]].concat(chart.series.map(() => []));
    chart.plot = new uPlot(options, empty, container);
    chart.container = container;
    new ResizeObserver(() => {
      chart.plot.setSize({ width: container.clientWidth, height: CHART_HEIGHT });
    }).observe(container);
  }

  // The newest value of each field that is not null: an idle interval has no percentiles.
  function latestOf(points) {
    const latest = {};
    for (const p of points) {
      for (const [key, value] of Object.entries(p)) {
        if (value != null) latest[key] = value;
      }
    }
    return latest;
  }

  function draw(chart, points, latest) {
    const xs = points.map((p) => p.t);
    const data = [xs].concat(chart.series.map((s) => points.map((p) => p[s.field])));
    chart.plot.setData(data);
    chart.container.dataset.points = String(points.length);
    document.getElementById(`${chart.id}-latest`).textContent = points.length
      ? chart.latest(latest)
      : "";
  }

  function setStatus(text, isError) {
    const status = document.getElementById("status");
    status.textContent = text;
    status.classList.toggle("error", isError);
  }

  async function poll() {
    let interval = MAX_POLL_SECONDS;
    try {
      const response = await fetch("/dashboard/data", { cache: "no-store" });
      if (!response.ok) throw new Error(`/dashboard/data answered ${response.status}`);
      const body = await response.json();
      interval = Math.min(MAX_POLL_SECONDS, Math.max(MIN_POLL_SECONDS, body.interval_seconds));
      const latest = latestOf(body.points);
      for (const chart of CHARTS) draw(chart, body.points, latest);
      const time = new Date().toLocaleTimeString();
      setStatus(
        `${body.points.length} points, one per ${body.interval_seconds} s · updated ${time}`,
        false,
      );
    } catch (error) {
      setStatus(String(error.message || error), true);
    }
    setTimeout(poll, interval * 1000);
  }

  CHARTS.forEach(create);
  poll();
})();
