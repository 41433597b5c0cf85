// The task page's pictures, in plain SVG (no library): run durations and start lateness
// per agent over recent executions, and a strip of coloured cells per agent (one column
// per execution) that shows at a glance which host fails and when. Labels are text nodes.

import {el, seconds, svg} from './dom.js';

const WIDTH = 640;
const HEIGHT = 180;
const PAD = {left: 64, right: 12, top: 12, bottom: 28};
const SERIES_CLASSES = 6;

function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) {
    if (step * power >= value) return step * power;
  }
  return 10 * power;
}

/**
 * A line chart: series = [{name, points: [{at: Date, value: seconds, label}]}].
 * Returns a <figure> with the chart, its legend and a caption.
 */
export function lineChart(title, series) {
  const points = series.flatMap((s) => s.points);
  const figure = el('figure', {class: 'chart'}, el('figcaption', {}, title));
  if (points.length === 0) {
    figure.append(el('p', {class: 'muted'}, 'no runs yet'));
    return figure;
  }
  const times = points.map((p) => p.at.getTime());
  let [t0, t1] = [Math.min(...times), Math.max(...times)];
  if (t0 === t1) [t0, t1] = [t0 - 1000, t1 + 1000];
  const top = niceMax(Math.max(...points.map((p) => p.value)));
  const low = Math.min(0, ...points.map((p) => p.value));
  const x = (t) => PAD.left + ((t - t0) / (t1 - t0)) * (WIDTH - PAD.left - PAD.right);
  const y = (v) => HEIGHT - PAD.bottom - ((v - low) / (top - low)) * (HEIGHT - PAD.top - PAD.bottom);
  const chart = svg('svg', {
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`, class: 'plot', role: 'img', 'aria-label': title,
  });
  for (const v of [low, (low + top) / 2, top]) {
    chart.append(
      svg('line', {x1: PAD.left, x2: WIDTH - PAD.right, y1: y(v), y2: y(v), class: 'grid'}),
      svg('text', {x: PAD.left - 6, y: y(v) + 4, class: 'tick', 'text-anchor': 'end'}, seconds(v)),
    );
  }
  chart.append(
    svg('text', {x: PAD.left, y: HEIGHT - 8, class: 'tick'}, new Date(t0).toLocaleTimeString()),
    svg('text', {x: WIDTH - PAD.right, y: HEIGHT - 8, class: 'tick', 'text-anchor': 'end'},
      new Date(t1).toLocaleTimeString()),
  );
  const legend = el('ul', {class: 'legend'});
  series.forEach((s, index) => {
    const colour = `c${index % SERIES_CLASSES}`;
    const ordered = [...s.points].sort((a, b) => a.at - b.at);
    chart.append(svg('polyline', {
      class: `line ${colour}`,
      points: ordered.map((p) => `${x(p.at.getTime()).toFixed(1)},${y(p.value).toFixed(1)}`).join(' '),
    }));
    for (const p of ordered) {
      chart.append(svg('circle', {cx: x(p.at.getTime()), cy: y(p.value), r: 3, class: `dot ${colour}`},
        svg('title', {}, `${s.name}: ${seconds(p.value)} at ${p.at.toLocaleString()}`)));
    }
    legend.append(el('li', {}, el('span', {class: `swatch ${colour}`}), s.name));
  });
  figure.append(chart, legend);
  return figure;
}

/**
 * Executions (oldest first) as a strip per agent: rows = [{name, cells: [status|null]}],
 * columns = [{label}]. A null cell: the agent was not expected in that execution.
 */
export function statusStrip(title, rows, columns) {
  const figure = el('figure', {class: 'chart strip'}, el('figcaption', {}, title));
  if (rows.length === 0 || columns.length === 0) {
    figure.append(el('p', {class: 'muted'}, 'no runs yet'));
    return figure;
  }
  const cell = 14;
  const nameWidth = 150;
  const width = nameWidth + columns.length * cell;
  const chart = svg('svg', {
    viewBox: `0 0 ${width} ${rows.length * cell + 2}`, class: 'cells', role: 'img',
    'aria-label': title, width, height: rows.length * cell + 2,
  });
  rows.forEach((row, r) => {
    const name = row.name.length > 22 ? `${row.name.slice(0, 21)}…` : row.name;
    chart.append(svg('text', {x: nameWidth - 6, y: r * cell + 11, class: 'tick', 'text-anchor': 'end'},
      name, svg('title', {}, row.name)));
    row.cells.forEach((state, c) => {
      if (state === null) return;
      chart.append(svg('rect', {
        x: nameWidth + c * cell, y: r * cell + 1, width: cell - 2, height: cell - 2,
        class: `cell s-${state}`, 'data-status': state,
      }, svg('title', {}, `${row.name} · ${columns[c].label} · ${state}`)));
    });
  });
  figure.append(chart);
  return figure;
}
