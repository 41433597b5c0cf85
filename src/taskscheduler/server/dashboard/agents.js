// The agents page: state, last heartbeat, labels, version, running and spooled runs, and
// start lateness (p50 / p99 over the fleet's recent scheduled executions, from the server).

import {el, seconds, status, when} from './dom.js';

function lateness(agent) {
  const late = agent.start_lateness;
  if (!late) return el('span', {class: 'muted'}, '—');
  return el('span', {title: `over ${late.samples} runs`},
    `p50 ${seconds(late.p50_seconds)} · p99 ${seconds(late.p99_seconds)}`);
}

function count(value) {
  return value === null || value === undefined ? el('span', {class: 'muted'}, '—') : String(value);
}

export class AgentsPage {
  constructor(app) {
    this.app = app;
    this.table = el('div', {class: 'table-wrap'});
    this.node = el('section', {class: 'page', id: 'agents-page'}, el('h1', {}, 'Agents'), this.table);
  }

  async refresh() {
    const agents = await this.app.agents(true);
    const rows = agents.map((a) => el('tr', {'data-agent': a.agent_id},
      el('td', {}, el('div', {}, a.hostname || a.url), el('div', {class: 'muted small'}, a.url),
        el('div', {class: 'muted small'}, el('code', {}, a.agent_id))),
      el('td', {}, status(a.state, a.state.replace(/_/g, ' '))),
      el('td', {}, when(a.last_seen_at)),
      el('td', {}, Object.entries(a.labels).map(([k, v]) => el('span', {class: 'label'}, `${k}=${v}`))),
      el('td', {}, a.version || el('span', {class: 'muted'}, '—')),
      el('td', {class: 'number'}, count(a.tasks)),
      el('td', {class: 'number'}, count(a.running)),
      el('td', {class: 'number'}, count(a.spooled)),
      el('td', {}, lateness(a))));
    this.table.replaceChildren(el('table', {class: 'list'},
      el('thead', {}, el('tr', {}, ...['Agent', 'State', 'Last seen', 'Labels', 'Version', 'Tasks',
        'Running', 'Spooled', 'Start lateness'].map((h) => el('th', {}, h)))),
      el('tbody', {}, rows.length ? rows : el('tr', {}, el('td', {colspan: 9, class: 'muted'}, 'no agent enrolled')))));
  }
}
