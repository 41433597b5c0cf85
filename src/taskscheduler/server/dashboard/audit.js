// The audit log, newest first, a page of 100 at a time.

import {api, query} from './api.js';
import {el, when} from './dom.js';

export class AuditPage {
  constructor(app) {
    this.app = app;
    this.before = null;
    this.table = el('div', {class: 'table-wrap'});
    this.pager = el('p', {});
    this.node = el('section', {class: 'page', id: 'audit-page'}, el('h1', {}, 'Audit log'), this.table, this.pager);
  }

  async refresh() {
    const page = await api('GET', `/api/v1/audit${query({limit: 100, before: this.before})}`);
    const rows = page.events.map((e) => el('tr', {},
      el('td', {}, when(e.at)),
      el('td', {}, e.actor),
      el('td', {}, el('code', {}, e.action)),
      el('td', {}, el('code', {}, e.target)),
      el('td', {}, e.peer),
      el('td', {}, Object.keys(e.details || {}).length
        ? el('code', {class: 'details'}, JSON.stringify(e.details)) : '')));
    this.table.replaceChildren(el('table', {class: 'list'},
      el('thead', {}, el('tr', {}, ...['When', 'Who', 'What', 'Target', 'From', 'Details'].map((h) => el('th', {}, h)))),
      el('tbody', {}, rows.length ? rows : el('tr', {}, el('td', {colspan: 6, class: 'muted'}, 'nothing yet')))));
    const buttons = [];
    if (this.before !== null) {
      buttons.push(el('button', {type: 'button', onclick: () => { this.before = null; this.app.refreshNow(); }}, 'Newest'));
    }
    if (page.next_before !== null) {
      buttons.push(el('button', {type: 'button', onclick: () => { this.before = page.next_before; this.app.refreshNow(); }}, 'Older'));
    }
    this.pager.replaceChildren(...buttons);
  }
}
