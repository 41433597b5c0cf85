// The dashboard's entry point: routes (#/tasks, #/tasks/<id>, #/agents, #/audit), the
// sign-in, the confirmation dialog, and the live loop.
//
// Live by polling: the page asks the API again every POLL_MS while its tab is visible.
// Polling works through every proxy and reuses the API as it is (its access checks, its
// limits); server-sent events would hold a connection per open tab, against the server's
// idle and per-client connection limits, for news that is a few seconds old at worst.

import {AgentsPage} from './agents.js';
import {api, setToken, token, Unauthorized} from './api.js';
import {AuditPage} from './audit.js';
import {TaskPage} from './task.js';
import {TasksPage} from './tasks.js';

const POLL_MS = 5000;
const byId = (id) => document.getElementById(id);

class App {
  constructor() {
    this.main = byId('main');
    this.page = null;
    this.timer = null;
    this.generation = 0;
    this.agentList = null;
  }

  start() {
    window.addEventListener('hashchange', () => this.route());
    document.addEventListener('visibilitychange', () => {
      if (!document.hidden) this.refreshNow();
    });
    byId('sign-in-form').addEventListener('submit', (event) => {
      event.preventDefault();
      const input = byId('token');
      setToken(input.value.trim());
      input.value = '';
      this.route();
    });
    byId('sign-out').addEventListener('click', () => {
      setToken(null);
      this.showSignIn('Signed out.');
    });
    this.route();
  }

  route() {
    const parts = window.location.hash.replace(/^#\/?/, '').split('/').filter(Boolean)
      .map((part) => {
        try {
          return decodeURIComponent(part);
        } catch {
          return part; // a malformed escape: the API answers 400 for it
        }
      });
    let page;
    if (parts[0] === 'tasks' && parts[1]) page = new TaskPage(this, parts[1]);
    else if (parts[0] === 'agents') page = new AgentsPage(this);
    else if (parts[0] === 'audit') page = new AuditPage(this);
    else page = new TasksPage(this);
    for (const a of document.querySelectorAll('nav a')) {
      if (a.dataset.page === (parts[0] || 'tasks')) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
    byId('sign-in').hidden = true;
    this.main.hidden = false;
    byId('sign-out').hidden = !token();
    this.page = page;
    this.main.replaceChildren(page.node);
    this.refreshNow();
  }

  /** The agents, asked once per refresh (``fresh``: ask again now). */
  agents(fresh = false) {
    if (fresh || this.agentList === null) {
      this.agentList = api('GET', '/api/v1/agents').then((body) => body.agents);
    }
    return this.agentList;
  }

  agentName(id, agents) {
    const agent = agents.find((a) => a.agent_id === id);
    if (!agent) return id.slice(0, 8);
    return agent.hostname ? `${agent.hostname} (${agent.url.replace(/^https?:\/\//, '')})` : agent.url;
  }

  async refreshNow() {
    clearTimeout(this.timer);
    const generation = ++this.generation;
    const page = this.page;
    this.agentList = null;
    try {
      await page.refresh();
      if (generation === this.generation) this.showProblem(null);
    } catch (error) {
      if (generation !== this.generation) return;
      if (error instanceof Unauthorized) {
        this.showSignIn(token() ? 'That token was refused.' : '');
        return; // no polling until signed in
      }
      this.showProblem(`Could not load: ${error.message}`);
    }
    if (generation === this.generation) {
      this.timer = setTimeout(() => this.tick(), POLL_MS);
    }
  }

  tick() {
    // Not while hidden (visibilitychange resumes) nor under an open dialog.
    if (document.hidden || byId('confirm').open) {
      this.timer = setTimeout(() => this.tick(), POLL_MS);
      return;
    }
    this.refreshNow();
  }

  showSignIn(message) {
    clearTimeout(this.timer);
    this.generation += 1;
    this.main.hidden = true;
    this.main.replaceChildren();
    byId('sign-out').hidden = true;
    byId('sign-in').hidden = false;
    const error = byId('sign-in-error');
    error.textContent = message || '';
    error.hidden = !message;
    byId('token').focus();
  }

  showProblem(message) {
    const banner = byId('problem');
    banner.textContent = message || '';
    banner.hidden = !message;
    byId('live').classList.toggle('stale', Boolean(message));
  }

  /** Ask ``question`` in the confirmation dialog: true if confirmed. */
  confirm(question) {
    const dialog = byId('confirm');
    byId('confirm-text').textContent = question;
    return new Promise((resolve) => {
      dialog.addEventListener('close', () => resolve(dialog.returnValue === 'ok'), {once: true});
      dialog.returnValue = '';
      dialog.showModal();
    });
  }

  /** Run a change; show what went wrong instead of throwing. */
  async attempt(change) {
    try {
      await change();
    } catch (error) {
      if (error instanceof Unauthorized) this.showSignIn('That token was refused.');
      else this.showProblem(`Refused: ${error.message}`);
    }
  }
}

new App().start();
