// The fedhive dashboard: reads the operator API with the token the operator gives (the URL's
// `#token=` fragment, which never reaches the server, or the form) and redraws every 5 s.
'use strict';

const SVG = 'http://www.w3.org/2000/svg';
const $ = (id) => document.getElementById(id);

function token() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem('fedhive-token', decodeURIComponent(m[1]));
    history.replaceState(null, '', location.pathname + location.search);
  }
  return sessionStorage.getItem('fedhive-token');
}

class Unauthorized extends Error {}

async function api(path) {
  const t = token();
  const r = await fetch(path, { headers: t ? { Authorization: 'Bearer ' + t } : {} });
  if (r.status === 401) throw new Unauthorized();
  if (!r.ok) throw new Error(`${path}: ${r.status} ${await r.text()}`);
  return path === '/metrics' ? r.text() : r.json();
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function fill(table, rows) {
  const body = table.tBodies[0];
  body.replaceChildren(...rows);
}

function row(cells, nums, cls) {
  const tr = el('tr', undefined, cls);
  cells.forEach((c, i) => tr.append(el('td', c, nums.includes(i) ? 'num' : '')));
  return tr;
}

// Lines over rounds: accuracy on [0, 1], loss on [0, its maximum].
function drawPlot(rounds) {
  const plot = $('plot');
  const [w, h, pad] = [640, 240, 34];
  plot.replaceChildren();
  const reported = rounds.filter((r) => r.reports);
  plot.append(svg('line', { x1: pad, y1: h - pad, x2: w - pad, y2: h - pad, class: 'axis' }));
  plot.append(svg('line', { x1: pad, y1: pad / 2, x2: pad, y2: h - pad, class: 'axis' }));
  if (reported.length === 0) {
    plot.append(svg('text', { x: pad + 10, y: h / 2, class: 'label' }, 'no device reports yet'));
    return;
  }
  const seqs = rounds.map((r) => r.seq);
  const [lo, hi] = [Math.min(...seqs), Math.max(...seqs)];
  const x = (seq) => pad + ((seq - lo) / Math.max(1, hi - lo)) * (w - 2 * pad);
  const y = (v) => h - pad - v * (h - 1.5 * pad);
  const maxLoss = Math.max(...reported.map((r) => r.reports.loss), 1e-9);
  const line = (cls, value) => {
    const points = reported
      .filter((r) => value(r) !== null)
      .map((r) => `${x(r.seq).toFixed(1)},${y(value(r)).toFixed(1)}`);
    plot.append(svg('polyline', { class: cls, points: points.join(' '), 'data-points': points.length }));
  };
  line('accuracy', (r) => (r.reports.accuracy ?? null));
  line('loss', (r) => r.reports.loss / maxLoss);
  plot.append(svg('text', { x: 2, y: y(1) + 4, class: 'label' }, '1.0'));
  plot.append(svg('text', { x: 2, y: y(0) + 4, class: 'label' }, '0'));
  plot.append(svg('text', { x: pad, y: h - 8, class: 'label' }, `round ${lo}`));
  plot.append(svg('text', { x: w - pad - 50, y: h - 8, class: 'label' }, `round ${hi}`));
  plot.append(svg('text', { x: w - 250, y: 14, class: 'label' },
    `accuracy (blue, 0–1)   loss (orange, 0–${maxLoss.toPrecision(3)})`));
}

// Bars per round: assignments handed out behind, accepted updates in front.
function drawUploads(rounds) {
  const chart = $('uploads');
  const [w, h, pad] = [640, 160, 20];
  chart.replaceChildren();
  const top = Math.max(1, ...rounds.map((r) => r.assigned));
  const slot = (w - 2 * pad) / Math.max(1, rounds.length);
  rounds.forEach((r, i) => {
    const bar = (value, cls, shrink) => {
      const height = (value / top) * (h - 2 * pad);
      chart.append(svg('rect', {
        x: pad + i * slot + shrink, y: h - pad - height, width: Math.max(1, slot - 2 * shrink - 1),
        height, class: cls,
      }));
    };
    bar(r.assigned, 'assigned', 0);
    bar(r.accepted, 'accepted', slot / 4);
  });
  chart.append(svg('text', { x: pad, y: 12, class: 'label' },
    `grey: assigned, green: accepted (most per round: ${top})`));
}

function seconds(r) {
  return r.closed_unix ? `${r.closed_unix - r.opened_unix} s` : '';
}

function outcomes(metrics, task) {
  const out = [];
  const re = /^fedhive_updates_total\{task="([^"]*)",outcome="([^"]*)"\} (\S+)$/;
  for (const line of metrics.split('\n')) {
    const m = line.match(re);
    if (m && m[1] === task) out.push([m[2], m[3]]);
  }
  return out;
}

async function refresh() {
  const tasks = await api('/v1/tasks');
  const chosen = new URLSearchParams(location.search).get('task') || (tasks[0] && tasks[0].task_id);
  fill($('tasks'), tasks.map((t) => {
    const tr = row(['', t.state, t.strategy, t.model, String(t.model_version),
      `${t.committed_rounds}/${t.rounds}`], [4, 5], t.task_id === chosen ? 'selected' : '');
    const link = el('a', t.task_id);
    link.href = `?task=${encodeURIComponent(t.task_id)}`;
    tr.cells[0].append(link);
    return tr;
  }));
  $('login').hidden = true;
  $('main').hidden = false;
  if (!chosen) {
    $('status').textContent = 'no tasks yet';
    return;
  }
  const enc = encodeURIComponent(chosen);
  const [status, rounds, metrics] = await Promise.all([
    api(`/v1/tasks/${enc}`), api(`/v1/tasks/${enc}/rounds`), api('/metrics'),
  ]);
  $('task').hidden = false;
  $('task-title').textContent = `Task ${status.task_id}`;
  $('task-summary').textContent =
    `${status.state}, model ${status.config.model} version ${status.model_version}, ` +
    `${status.committed_rounds} of ${status.config.rounds} rounds committed`;
  drawPlot(rounds);
  drawUploads(rounds);
  fill($('outcomes'), outcomes(metrics, chosen).map((o) => row(o, [1])));
  fill($('rounds'), rounds.slice().reverse().map((r) => row([
    String(r.seq), r.state, String(r.accepted), String(r.assigned), String(r.total_samples), seconds(r),
    r.reports ? r.reports.loss.toFixed(4) : '',
    r.reports && r.reports.accuracy !== null ? r.reports.accuracy.toFixed(4) : '',
  ], [0, 2, 3, 4, 5, 6, 7])));
  $('status').textContent = `updated ${new Date().toLocaleTimeString()}`;
}

async function loop() {
  try {
    await refresh();
    $('error').textContent = '';
  } catch (e) {
    if (e instanceof Unauthorized) {
      sessionStorage.removeItem('fedhive-token');
      $('status').textContent = 'an operator token is needed';
      $('login').hidden = false;
      return;
    }
    $('error').textContent = String(e);
  }
  setTimeout(loop, 5000);
}

$('login').addEventListener('submit', (event) => {
  event.preventDefault();
  sessionStorage.setItem('fedhive-token', $('token').value);
  loop();
});
loop();
