// One task: its settings, the pictures of its recent executions, its history with every
// agent's output side by side (identical outputs grouped, truncation shown), and the
// pause / resume / run now / delete buttons, each behind a confirmation.

import {api, query} from './api.js';
import {lineChart, statusStrip} from './charts.js';
import {el, parseInstant, seconds, status, when} from './dom.js';
import {scheduleInWords} from './schedule.js';

const HISTORY = 50;

function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

function stream(output, name) {
  if (output[name] === undefined) return null;
  const size = output[`${name}_bytes`];
  const kept = new TextEncoder().encode(output[name]).length;
  const notes = [];
  if (output[`${name}_truncated`]) {
    notes.push(el('span', {class: 'truncated'},
      `truncated: ${bytes(size)} written, the first and last ${bytes(kept)} kept`));
  }
  if (output[`${name}_base64`] !== undefined) {
    notes.push(el('span', {class: 'muted'}, 'not UTF-8: shown with replacement characters'));
  }
  return el('div', {class: `stream ${name}`}, el('div', {class: 'stream-name'}, name, ' ', ...notes),
    el('pre', {}, output[name]));
}

/** Agents whose outputs are the same (status, exit, signal, stdout, stderr) share a box. */
export function groupOutputs(outputs) {
  const groups = new Map();
  for (const output of outputs) {
    const key = JSON.stringify([output.status, output.exit_code, output.signal ?? null,
      output.stdout ?? null, output.stderr ?? null, output.reason ?? null]);
    if (!groups.has(key)) groups.set(key, {output, agents: []});
    groups.get(key).agents.push(output);
  }
  return [...groups.values()];
}

function outcome(output) {
  const parts = [status(output.status)];
  if (output.exit_code !== null && output.exit_code !== undefined) parts.push(` exit ${output.exit_code}`);
  if (output.signal) parts.push(` signal ${output.signal}`);
  if (output.reason) parts.push(el('span', {class: 'muted'}, ` ${output.reason}`));
  if (output.attempt > 1) parts.push(el('span', {class: 'muted'}, ` attempt ${output.attempt}`));
  return el('div', {class: 'outcome'}, ...parts);
}

function executionView(execution, nameOf) {
  const groups = groupOutputs(execution.outputs);
  const boxes = groups.map(({output, agents}) => el('div', {class: 'output-group'},
    el('div', {class: 'agents-of-group'}, agents.length > 1 ? `${agents.length} agents: ` : '',
      agents.map((a) => nameOf(a.agent_id)).join(', ')),
    outcome(output), stream(output, 'stdout'), stream(output, 'stderr'),
    output.stdout === undefined && output.stderr === undefined ? el('p', {class: 'muted'}, 'no output') : null));
  const missing = (execution.missing_agents || []).map((m) => (m.agent_id ? nameOf(m.agent_id) : m.url));
  return el('article', {class: 'execution', 'data-scheduled-at': execution.scheduled_at},
    el('header', {},
      el('strong', {}, parseInstant(execution.scheduled_at).toLocaleString()), ' ',
      el('span', {class: 'muted'}, execution.trigger === 'manual' ? 'run now' : 'scheduled'), ' ',
      execution.complete ? status('complete') : status('waiting', 'waiting for agents'),
      ` ${execution.outputs.length}/${execution.expected_agents} reported`,
      groups.length > 1 ? el('span', {class: 'differ'}, ` · ${groups.length} different outputs`) : ''),
    el('div', {class: 'outputs'}, ...boxes),
    missing.length ? el('p', {class: 'missing'}, `missing: ${missing.join(', ')}`) : null);
}

function setting(name, value) {
  return [el('dt', {}, name), el('dd', {}, value === null || value === undefined || value === '' ? '—' : value)];
}

function settings(task) {
  const target = task.target
    ? (task.target.agents ? `agents ${task.target.agents.join(', ')}`
      : Object.entries(task.target.labels).map(([k, v]) => `${k}=${v}`).join(', '))
    : 'every agent of the fleet';
  const env = Object.keys(task.env || {});
  return el('dl', {class: 'settings'},
    setting('Schedule', scheduleInWords(task)),
    setting('Next runs', task.state === 'active' ? task.next_instants.slice(0, 3).map((at) => [when(at), ' ']) : '—'),
    setting('Time limit', seconds(task.time_limit_seconds)),
    setting('Runs on', `${task.run_on === 'one' ? 'one agent of' : 'each of'} ${target}`),
    setting('Overlap', task.overlap + (task.overlap === 'allow' ? ` (at most ${task.max_concurrent})` : '')),
    setting('Retries', task.retries ? `${task.retries}, ${task.retry_delay_seconds} s apart` : 'none'),
    setting('Environment', env.length ? env.join(', ') : 'none'),
    setting('Working directory', task.working_dir),
    setting('Revision', `${task.revision}, changed ${parseInstant(task.updated_at).toLocaleString()}`),
    setting('Created', parseInstant(task.created_at).toLocaleString()),
    task.paused_at ? setting('Paused', when(task.paused_at)) : null,
    task.deleted_at ? setting('Deleted', when(task.deleted_at)) : null,
    setting('Id', el('code', {}, task.task_id)));
}

/** Series per agent from executions (oldest first): duration, or start lateness. */
export function series(executions, nameOf, measure) {
  const byAgent = new Map();
  for (const execution of executions) {
    for (const output of execution.outputs) {
      const value = measure(execution, output);
      if (value === null) continue;
      if (!byAgent.has(output.agent_id)) byAgent.set(output.agent_id, []);
      byAgent.get(output.agent_id).push({at: parseInstant(execution.scheduled_at), value});
    }
  }
  return [...byAgent.entries()].map(([id, points]) => ({name: nameOf(id), points}))
    .sort((a, b) => a.name.localeCompare(b.name));
}

function duration(execution, output) {
  if (!output.started_at || !output.finished_at) return null;
  return (parseInstant(output.finished_at) - parseInstant(output.started_at)) / 1000;
}

function lateness(execution, output) {
  // The first attempt, of a scheduled instant: a retry or a run-now has no lateness.
  const first = (output.attempts || [output])[0];
  if (execution.trigger !== 'schedule' || !first.started_at) return null;
  return (parseInstant(first.started_at) - parseInstant(execution.scheduled_at)) / 1000;
}

function strip(executions, nameOf) {
  const ids = new Set();
  for (const e of executions) {
    for (const o of e.outputs) ids.add(o.agent_id);
    for (const m of e.missing_agents || []) if (m.agent_id) ids.add(m.agent_id);
  }
  const rows = [...ids].map((id) => ({
    name: nameOf(id),
    cells: executions.map((e) => {
      const output = e.outputs.find((o) => o.agent_id === id);
      if (output) return output.status;
      if ((e.missing_agents || []).some((m) => m.agent_id === id)) return e.complete ? 'missing' : 'waiting';
      return null;
    }),
  })).sort((a, b) => a.name.localeCompare(b.name));
  const columns = executions.map((e) => ({label: parseInstant(e.scheduled_at).toLocaleString()}));
  return statusStrip('Executions per agent (oldest left)', rows, columns);
}

export class TaskPage {
  constructor(app, taskId) {
    this.app = app;
    this.taskId = taskId;
    this.body = el('div', {}, el('p', {class: 'muted'}, 'loading…'));
    this.node = el('section', {class: 'page', id: 'task-page'}, this.body);
  }

  path(suffix = '') {
    return `/api/v1/tasks/${encodeURIComponent(this.taskId)}${suffix}`;
  }

  action(label, question, method, suffix, after) {
    return el('button', {type: 'button', 'data-action': label.toLowerCase().replace(/\s+/g, '-'),
      class: label === 'Delete' ? 'danger' : '',
      onclick: async () => {
        if (!(await this.app.confirm(question))) return;
        await this.app.attempt(async () => {
          await api(method, this.path(suffix));
          if (after) after(); else await this.app.refreshNow();
        });
      }}, label);
  }

  async refresh() {
    const [task, history, agents] = await Promise.all([
      api('GET', this.path()),
      api('GET', this.path(`/executions${query({limit: HISTORY})}`)),
      this.app.agents(),
    ]);
    const nameOf = (id) => this.app.agentName(id, agents);
    const oldestFirst = [...history.executions].reverse();
    const live = task.state !== 'deleted';
    const quoted = `“${task.command.length > 80 ? `${task.command.slice(0, 79)}…` : task.command}”`;
    const buttons = live ? [
      task.state === 'paused'
        ? this.action('Resume', `Resume ${quoted}? It runs again from its next instant.`, 'POST', '/resume')
        : this.action('Pause', `Pause ${quoted}? No agent runs it until it is resumed.`, 'POST', '/pause'),
      this.action('Run now', `Run ${quoted} now, once?`, 'POST', '/run'),
      this.action('Delete', `Delete ${quoted}? Agents stop running it; its history stays.`, 'DELETE', '',
        () => { window.location.hash = '#/tasks'; }),
    ] : [];
    this.body.replaceChildren(
      el('div', {class: 'task-head'},
        el('h1', {}, el('code', {id: 'task-command'}, task.command)),
        el('span', {id: 'task-state'}, status(task.state)),
        el('div', {class: 'actions'}, ...buttons)),
      settings(task),
      el('h2', {}, `Recent executions (${history.executions.length})`),
      strip(oldestFirst, nameOf),
      el('div', {class: 'charts'},
        lineChart('Run duration per agent', series(oldestFirst, nameOf, duration)),
        lineChart('Start lateness per agent (instant to process start)', series(oldestFirst, nameOf, lateness))),
      el('h2', {}, 'History'),
      history.executions.length
        ? el('div', {class: 'history'}, ...history.executions.slice(0, 20).map((e) => executionView(e, nameOf)))
        : el('p', {class: 'muted'}, 'no execution yet'));
  }
}
