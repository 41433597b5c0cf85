// The JSON API, with the operator's token. The token is typed once and kept in
// sessionStorage (this tab only, gone when it closes) and sent as Authorization: Bearer.
// No cookie is ever used, so a page of another site cannot make the browser send a
// credential here: that is the dashboard's defence against CSRF (with the server's
// Origin check on every POST, PATCH and DELETE).

const TOKEN_KEY = 'taskscheduler.operator-token';

export class Unauthorized extends Error {}

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

export async function api(method, path, body) {
  const headers = {Accept: 'application/json'};
  const held = token();
  if (held) headers.Authorization = `Bearer ${held}`;
  const init = {method, headers, credentials: 'omit', cache: 'no-store', redirect: 'error'};
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (response.status === 401) {
    throw new Unauthorized(data?.error?.message || 'an operator token is needed');
  }
  if (!response.ok) {
    const error = data?.error || {};
    throw new ApiError(response.status, error.code, error.message || response.statusText);
  }
  return data;
}

/** A path with its query string: query({state: 'active'}) -> '?state=active'. */
export function query(parameters) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(parameters)) {
    if (value !== null && value !== undefined && value !== '') search.set(name, String(value));
  }
  const text = search.toString();
  return text ? `?${text}` : '';
}
