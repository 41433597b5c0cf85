// Building the page. Every piece of data reaches the DOM as text (text nodes, i.e.
// textContent), never as HTML: a command printing <script> shows as those characters.
// Nothing here assigns innerHTML, outerHTML or insertAdjacentHTML.

const SVG_NS = 'http://www.w3.org/2000/svg';

function setAttributes(node, attributes) {
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith('on') && typeof value === 'function') {
      node.addEventListener(name.slice(2), value);
    } else {
      node.setAttribute(name, value === true ? '' : String(value));
    }
  }
}

function appendChildren(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** An HTML element: el('td', {class: 'x'}, 'text', otherNode). */
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  setAttributes(node, attributes);
  appendChildren(node, children);
  return node;
}

/** An SVG element, the same way. */
export function svg(tag, attributes = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  setAttributes(node, attributes);
  appendChildren(node, children);
  return node;
}

/** An in-page link: only ever to a #/ route built from ids the API gave. */
export function link(route, ...children) {
  return el('a', {href: '#/' + route.map(encodeURIComponent).join('/')}, ...children);
}

export function parseInstant(text) {
  return text ? new Date(text) : null;
}

/** "in 4 s", "3 min ago": how far an instant is from now. */
export function relative(text, now = Date.now()) {
  const at = parseInstant(text);
  if (!at) return '—';
  const seconds = Math.round((at.getTime() - now) / 1000);
  const size = Math.abs(seconds);
  let words;
  if (size < 90) words = `${size} s`;
  else if (size < 90 * 60) words = `${Math.round(size / 60)} min`;
  else if (size < 36 * 3600) words = `${Math.round(size / 3600)} h`;
  else words = `${Math.round(size / 86400)} d`;
  return seconds >= 0 ? `in ${words}` : `${words} ago`;
}

/** An instant shown relative to now, its exact local time in the tooltip. */
export function when(text) {
  if (!text) return el('span', {class: 'muted'}, '—');
  const at = parseInstant(text);
  return el('time', {datetime: text, title: at.toLocaleString()}, relative(text));
}

export function seconds(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return '—';
  const size = Math.abs(value);
  if (size < 1) return `${Math.round(value * 1000)} ms`;
  if (size < 120) return `${value.toFixed(size < 10 ? 2 : 1)} s`;
  return `${(value / 60).toFixed(1)} min`;
}

/** A coloured status badge (the colour comes from the class, app.css). */
export function status(name, text = name) {
  return el('span', {class: `status s-${String(name).replace(/[^a-z_]/g, '')}`}, text);
}
