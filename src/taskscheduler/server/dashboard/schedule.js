// A task's schedule in words: "every 30 seconds", or a cron expression read aloud with
// its time zone ("every day at 02:30 (Europe/Paris)"); anything unusual stays as written.

const DAYS = ['Sunday', 'Monday', 'Tuesday', 'Wednesday', 'Thursday', 'Friday', 'Saturday'];
const NUMBER = /^[0-9]+$/;

function clock(hour, minute) {
  return `${hour.padStart(2, '0')}:${minute.padStart(2, '0')}`;
}

export function cronInWords(expression) {
  const fields = expression.trim().split(/\s+/);
  if (fields.length !== 5) return null;
  const [minute, hour, day, month, weekday] = fields;
  const everyDay = day === '*' && month === '*';
  const step = /^\*\/([0-9]+)$/;
  if (everyDay && weekday === '*' && hour === '*') {
    if (minute === '*') return 'every minute';
    const m = minute.match(step);
    if (m) return `every ${m[1]} minutes`;
    if (NUMBER.test(minute)) return `every hour at minute ${minute}`;
  }
  if (everyDay && weekday === '*' && minute === '0' && step.test(hour)) {
    return `every ${hour.match(step)[1]} hours`;
  }
  if (!NUMBER.test(minute) || !NUMBER.test(hour)) return null;
  const at = clock(hour, minute);
  if (everyDay && weekday === '*') return `every day at ${at}`;
  if (everyDay && weekday === '1-5') return `weekdays at ${at}`;
  if (everyDay && NUMBER.test(weekday) && Number(weekday) <= 7) {
    return `every ${DAYS[Number(weekday) % 7]} at ${at}`;
  }
  if (NUMBER.test(day) && month === '*' && weekday === '*') return `monthly on day ${day} at ${at}`;
  return null;
}

/** The schedule of a task (its JSON) in words. */
export function scheduleInWords(task) {
  if (task.cron) {
    const words = cronInWords(task.cron);
    const zone = task.timezone || 'UTC';
    return words ? `${words} (${zone}; cron ${task.cron})` : `cron ${task.cron} (${zone})`;
  }
  return task.frequency || '—';
}
