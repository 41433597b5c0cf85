// The tasks page: each task's schedule in words, state, next instant and its last
// execution as one coloured cell per agent; filtered by state and searched by command.

import {api, query} from './api.js';
import {el, link, status, when} from './dom.js';
import {scheduleInWords} from './schedule.js';

export function lastExecutionCells(last, nameOf) {
  if (!last) return el('span', {class: 'muted'}, 'never ran');
  const cells = (last.agents || []).map((a) =>
    el('span', {class: `cell s-${a.status}`, title: `${nameOf(a.agent_id)}: ${a.status}`,
      'data-agent': a.agent_id, 'data-status': a.status}));
  const waiting = Math.max(0, last.expected_agents - (last.agents || []).length);
  for (let i = 0; i < waiting; i += 1) {
    cells.push(el('span', {class: 'cell s-waiting', title: last.complete ? 'missing' : 'waiting'}));
  }
  return el('span', {class: 'cells-inline'}, ...cells, ' ', when(last.scheduled_at),
    last.trigger === 'manual' ? el('span', {class: 'muted'}, ' (run now)') : null);
}

export class TasksPage {
  constructor(app) {
    this.app = app;
    this.state = '';
    this.search = '';
    this.table = el('div', {class: 'table-wrap'});
    const states = el('select', {id: 'state-filter', 'aria-label': 'State',
      onchange: (event) => { this.state = event.target.value; this.app.refreshNow(); }},
    ...['', 'active', 'paused', 'deleted'].map((s) => el('option', {value: s}, s || 'all states')));
    let typing = null;
    const search = el('input', {id: 'command-search', type: 'search', placeholder: 'Search commands',
      'aria-label': 'Search commands', spellcheck: 'false',
      oninput: (event) => {
        clearTimeout(typing);
        typing = setTimeout(() => { this.search = event.target.value; this.app.refreshNow(); }, 250);
      }});
    this.node = el('section', {class: 'page', id: 'tasks-page'},
      el('h1', {}, 'Tasks'), el('div', {class: 'filters'}, states, search), this.table);
  }

  async refresh() {
    const [list, agents] = await Promise.all([
      api('GET', `/api/v1/tasks${query({limit: 500, state: this.state, command: this.search})}`),
      this.app.agents(),
    ]);
    const nameOf = (id) => this.app.agentName(id, agents);
    const rows = list.tasks.map((task) => el('tr', {'data-task': task.task_id},
      el('td', {class: 'command'}, link(['tasks', task.task_id], el('code', {}, task.command))),
      el('td', {}, scheduleInWords(task)),
      el('td', {}, status(task.state)),
      el('td', {}, task.state === 'active' ? when(task.next_instant) : el('span', {class: 'muted'}, '—')),
      el('td', {}, lastExecutionCells(task.last_execution, nameOf))));
    const table = el('table', {class: 'list'},
      el('thead', {}, el('tr', {}, ...['Command', 'Schedule', 'State', 'Next run', 'Last execution']
        .map((h) => el('th', {}, h)))),
      el('tbody', {}, rows.length ? rows : el('tr', {}, el('td', {colspan: 5, class: 'muted'}, 'no task'))));
    const more = list.next_cursor ? el('p', {class: 'muted'}, 'Showing the newest 500 tasks.') : null;
    this.table.replaceChildren(table, more || '');
  }
}
