"""The PostgreSQL schema, as an ordered list of migrations, and the runner applying them.

Migration ``i`` (1-based) is ``MIGRATIONS[i - 1]``. Applied migrations are recorded in
``schema_migrations``; each runs in its own transaction, or, when it is a tuple of steps,
each step in its own (an online migration must not hold one step's locks through the
next; each step may run again if the server stops before the last, which records the
version). Never edit a migration that has shipped: append a new one.
"""

from __future__ import annotations

from twisted.logger import Logger

from taskscheduler.server.store.partitions import MIGRATION_16
from taskscheduler.server.store.pool import Cursor

#: A constant key for ``pg_advisory_lock``: two servers starting at once migrate in turn.
MIGRATION_LOCK_KEY = 0x7A5C_5EED_0001

CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""

MIGRATIONS: list[str | tuple[str, ...]] = [
    # 1: tasks, the fleet, deliveries, executions and results.
    """
    CREATE TABLE tasks (
        task_id uuid PRIMARY KEY,
        command text NOT NULL,
        frequency text NOT NULL,              -- canonical text, e.g. 'every 30 seconds'
        interval_seconds integer NOT NULL CHECK (interval_seconds > 0),
        anchor timestamptz NOT NULL,          -- execution k is due at anchor + k * interval
        time_limit_us bigint NOT NULL CHECK (time_limit_us > 0),
        created_at timestamptz NOT NULL
    );

    -- The agents every task runs on (AVAILABLE_SERVERS).
    CREATE TABLE fleet (
        agent_url text PRIMARY KEY
    );

    -- Which agent must run which task, and whether it acknowledged it.
    CREATE TABLE task_agents (
        task_id uuid NOT NULL REFERENCES tasks,
        agent_url text NOT NULL,
        delivered_at timestamptz,
        agent_id uuid,                         -- the identity that acknowledged it
        PRIMARY KEY (task_id, agent_url)
    );
    CREATE INDEX task_agents_by_agent ON task_agents (agent_url, task_id);
    CREATE INDEX task_agents_undelivered ON task_agents (agent_url)
        WHERE delivered_at IS NULL;

    -- One scheduled instant of a task, created by the first result reported for it.
    CREATE TABLE executions (
        task_id uuid NOT NULL REFERENCES tasks,
        scheduled_at timestamptz NOT NULL,
        expected integer NOT NULL,             -- agents assigned at the first report
        reported integer NOT NULL DEFAULT 0,
        completed_at timestamptz,              -- set when reported >= expected
        PRIMARY KEY (task_id, scheduled_at)
    );
    -- latest_output: the newest complete execution is one backward index probe.
    CREATE INDEX executions_completed ON executions (task_id, scheduled_at)
        WHERE completed_at IS NOT NULL;

    CREATE TABLE results (
        task_id uuid NOT NULL,
        scheduled_at timestamptz NOT NULL,
        agent_id uuid NOT NULL,
        status text NOT NULL,
        exit_code integer,
        signal integer,
        started_at timestamptz,
        finished_at timestamptz,
        stdout bytea NOT NULL,
        stdout_bytes bigint NOT NULL,
        stdout_truncated boolean NOT NULL,
        stderr bytea NOT NULL,
        stderr_bytes bigint NOT NULL,
        stderr_truncated boolean NOT NULL,
        digest bytea NOT NULL,                 -- sha256 of the body: DUPLICATE or CONFLICT
        received_at timestamptz NOT NULL,
        PRIMARY KEY (task_id, scheduled_at, agent_id),
        FOREIGN KEY (task_id, scheduled_at) REFERENCES executions
    );
    """,
    # 2: enrolled agents (only the hash of each credential) and the append-only audit log.
    """
    CREATE TABLE agents (
        agent_id uuid PRIMARY KEY,
        url text NOT NULL,                     -- the base URL the agent advertised
        credential_hash text NOT NULL UNIQUE,  -- sha256:<hex> of its tsa_ credential
        enrolled_at timestamptz NOT NULL,
        revoked_at timestamptz
    );
    -- One live agent per URL: assignments (by URL) name exactly one identity.
    CREATE UNIQUE INDEX agents_live_url ON agents (url) WHERE revoked_at IS NULL;

    CREATE TABLE audit_events (
        event_id bigserial PRIMARY KEY,
        at timestamptz NOT NULL,
        actor text NOT NULL,                   -- 'operator:<name>', 'agent:<id>', 'join:<name>'
        action text NOT NULL,                  -- 'task.created', 'agent.enrolled', ...
        target text NOT NULL,
        peer text NOT NULL,                    -- the client's address
        details jsonb NOT NULL DEFAULT '{}'
    );
    CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'audit_events is append-only';
    END
    $$;
    CREATE TRIGGER audit_events_append_only
        BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_events
        FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();
    """,
    # 3: deleting tasks. A deleted task keeps its history and its assignments; each
    # assignment whose agent has not yet confirmed it dropped the task is pending removal.
    """
    ALTER TABLE tasks ADD COLUMN deleted_at timestamptz;
    ALTER TABLE task_agents ADD COLUMN removal_pending boolean NOT NULL DEFAULT false;
    CREATE INDEX task_agents_removal_pending ON task_agents (agent_url, task_id)
        WHERE removal_pending;
    """,
    # 4: history retention. The pruner takes the oldest executions across every task;
    # this index finds them without scanning history (results go by their primary key).
    """
    CREATE INDEX executions_by_scheduled_at ON executions (scheduled_at);
    """,
    # 5: why a run was skipped or lost, in the agent's words (NULL when it says nothing).
    """
    ALTER TABLE results ADD COLUMN reason text;
    """,
    # 6: a revoked agent keeps its URL until an operator releases it: a join secret alone
    # never takes over the place of a revoked agent. Revocations whose URL a later agent
    # already took count as released (they were, under the rule before this one).
    """
    ALTER TABLE agents ADD COLUMN url_released_at timestamptz;
    UPDATE agents a SET url_released_at = a.revoked_at
    WHERE a.revoked_at IS NOT NULL
      AND EXISTS (SELECT 1 FROM agents b WHERE b.url = a.url AND b.enrolled_at > a.enrolled_at);
    """,
    # 7: changing, pausing and running tasks now (issue 10). Each revision of a task with
    # the instant it took effect and its grid (revision 1: the anchor); each pause; the
    # revision and trigger of each execution and result; the revision each agent is
    # due; run-nows each agent is still to be told of. Constant defaults: no rewrite.
    """
    ALTER TABLE tasks ADD COLUMN revision integer NOT NULL DEFAULT 1,
                      ADD COLUMN paused_at timestamptz,
                      ADD COLUMN updated_at timestamptz;
    CREATE INDEX tasks_newest_first ON tasks (created_at DESC, task_id DESC);

    CREATE TABLE task_revisions (
        task_id uuid NOT NULL REFERENCES tasks,
        revision integer NOT NULL,
        effective_at timestamptz NOT NULL,
        anchor timestamptz NOT NULL,
        interval_seconds integer NOT NULL CHECK (interval_seconds > 0),
        PRIMARY KEY (task_id, revision)
    );
    INSERT INTO task_revisions (task_id, revision, effective_at, anchor, interval_seconds)
        SELECT task_id, 1, anchor, anchor, interval_seconds FROM tasks;

    CREATE TABLE task_pauses (
        task_id uuid NOT NULL REFERENCES tasks,
        paused_at timestamptz NOT NULL,
        resumed_at timestamptz,
        PRIMARY KEY (task_id, paused_at)
    );

    -- The revision the agent is due: an acknowledgement of an older one (sent before a
    -- PATCH) does not count as delivered.
    ALTER TABLE task_agents ADD COLUMN due_revision integer NOT NULL DEFAULT 1;
    ALTER TABLE executions ADD COLUMN trigger text NOT NULL DEFAULT 'schedule',
                           ADD COLUMN revision integer NOT NULL DEFAULT 1;
    ALTER TABLE results ADD COLUMN trigger text NOT NULL DEFAULT 'schedule',
                        ADD COLUMN revision integer NOT NULL DEFAULT 1;

    CREATE TABLE manual_runs (
        task_id uuid NOT NULL,
        scheduled_at timestamptz NOT NULL,
        agent_url text NOT NULL,
        revision integer NOT NULL,
        deadline timestamptz NOT NULL,
        delivered_at timestamptz,
        PRIMARY KEY (task_id, scheduled_at, agent_url),
        FOREIGN KEY (task_id, scheduled_at) REFERENCES executions ON DELETE CASCADE
    );
    CREATE INDEX manual_runs_pending ON manual_runs (agent_url, scheduled_at)
        WHERE delivered_at IS NULL;
    """,
    # 8: the fleet at run time and agents' heartbeats. A member's added_at; what each
    # agent said in its last heartbeat; the agents told to leave (their URL left the
    # fleet, or they were revoked) until they confirm; the URLs each execution expects.
    """
    ALTER TABLE fleet ADD COLUMN added_at timestamptz NOT NULL DEFAULT now();
    ALTER TABLE agents
        ADD COLUMN last_seen_at timestamptz,
        ADD COLUMN version text,
        ADD COLUMN hostname text,
        ADD COLUMN started_at timestamptz,
        ADD COLUMN tasks integer,
        ADD COLUMN running integer,
        ADD COLUMN spooled integer,
        ADD COLUMN dropped_results integer;
    CREATE TABLE agent_leaves (
        agent_id uuid PRIMARY KEY REFERENCES agents,
        agent_url text NOT NULL,
        reason text NOT NULL,                  -- 'removed' or 'revoked'
        requested_at timestamptz NOT NULL
    );
    ALTER TABLE executions ADD COLUMN expected_urls text[];
    """,
    # 9: where and how each task runs (issue 11): targeting, run-on-one, overlap, retries,
    # env, working dir, as the task's JSON shows them ('{}': every default).
    """
    ALTER TABLE tasks ADD COLUMN options jsonb NOT NULL DEFAULT '{}';
    """,
    # 10: cron expressions in a time zone, instead of a frequency (issue 11). A cron
    # task's frequency and interval are NULL; every task has exactly one of the two.
    """
    ALTER TABLE tasks ALTER COLUMN frequency DROP NOT NULL,
                      ALTER COLUMN interval_seconds DROP NOT NULL,
                      ADD COLUMN cron text,
                      ADD COLUMN timezone text,
                      ADD CONSTRAINT tasks_frequency_or_cron
                          CHECK ((frequency IS NULL) <> (cron IS NULL));
    ALTER TABLE task_revisions ALTER COLUMN interval_seconds DROP NOT NULL,
                               ADD COLUMN cron text,
                               ADD COLUMN timezone text,
                               ADD CONSTRAINT task_revisions_interval_or_cron
                                   CHECK ((interval_seconds IS NULL) <> (cron IS NULL));
    """,
    # 11: agent labels, as the agent last said them (enrolment, heartbeats); none from an
    # agent that predates them. Whether the agent at each assigned URL matches the task's
    # target (every existing task has none: all match). Constant defaults: no rewrite.
    """
    ALTER TABLE agents ADD COLUMN labels jsonb NOT NULL DEFAULT '{}';
    ALTER TABLE task_agents ADD COLUMN matched boolean NOT NULL DEFAULT true;
    """,
    # 12: attempts. Each attempt of an agent's run is a result of its own (a retry is
    # attempt n + 1 of the same instant): the key gains the attempt, 1 for the first
    # run. ``final`` is false for an attempt the agent will retry. Pruning an execution
    # deletes all its results, so every attempt goes with it.
    """
    ALTER TABLE results
        ADD COLUMN attempt integer NOT NULL DEFAULT 1 CHECK (attempt >= 1),
        ADD COLUMN final boolean NOT NULL DEFAULT true;
    ALTER TABLE results DROP CONSTRAINT results_pkey;
    ALTER TABLE results ADD PRIMARY KEY (task_id, scheduled_at, agent_id, attempt);
    """,
    # 13: claims. The one agent that runs each instant of a run-on-one task (the first
    # claim the server granted, or the agent a run-now went to); the primary key lets
    # one in. Pruned with the history (by scheduled_at).
    """
    CREATE TABLE claims (
        task_id uuid NOT NULL REFERENCES tasks,
        scheduled_at timestamptz NOT NULL,
        agent_id uuid,                         -- NULL: a run-now, to whoever is at agent_url
        agent_url text NOT NULL,
        claimed_at timestamptz NOT NULL,
        PRIMARY KEY (task_id, scheduled_at)
    );
    CREATE INDEX claims_by_scheduled_at ON claims (scheduled_at);
    """,
    # 14: notifications (issue 12). The de-duplication state of each task's webhook, per
    # agent (the nil UUID: the whole task, for run on one), and every notification sent
    # or to send, with its delivery (server/notify/rules.py).
    """
    CREATE TABLE notify_state (
        task_id uuid NOT NULL REFERENCES tasks,
        agent_key uuid NOT NULL,
        failing boolean NOT NULL,
        last_at timestamptz NOT NULL,          -- the newest result it has seen
        PRIMARY KEY (task_id, agent_key)
    );
    CREATE TABLE notifications (
        notification_id bigserial PRIMARY KEY,
        task_id uuid NOT NULL REFERENCES tasks,
        agent_id uuid NOT NULL,
        scheduled_at timestamptz NOT NULL,
        event text NOT NULL,
        result_status text NOT NULL,
        exit_code integer,
        url text NOT NULL,
        created_at timestamptz NOT NULL,
        status text NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
        attempts integer NOT NULL,
        response_code integer,
        error text,
        updated_at timestamptz
    );
    CREATE INDEX notifications_by_task ON notifications (task_id, notification_id);
    CREATE INDEX notifications_pending ON notifications (notification_id)
        WHERE status = 'pending';
    """,
    # 15: replicas (issue 14). Every server replica says it is alive in ``replicas``;
    # work that must happen once (an agent's deliveries, retention, leave notices, ...)
    # is done by the holder of its lease, a row claimed until ``expires_at`` and taken
    # over by another replica once that passes (server/leases.py).
    """
    CREATE TABLE replicas (
        replica_id text PRIMARY KEY,
        started_at timestamptz NOT NULL,
        seen_at timestamptz NOT NULL
    );
    CREATE TABLE leases (
        name text PRIMARY KEY,                 -- 'agent:<url>' or 'job:<name>'
        holder text,                           -- a replica_id; NULL: free
        expires_at timestamptz NOT NULL
    );
    CREATE INDEX leases_by_holder ON leases (holder);
    -- A pending notification is sent by the replica that claimed it (the one that
    -- stored it, or one that took it over once the claim lapsed: server/notify).
    ALTER TABLE notifications ADD COLUMN claimed_by text,
        ADD COLUMN claimed_until timestamptz;
    -- The agents at a URL, live or revoked, by index: whichever replica answers, an
    -- execution's missing agents are named by a probe per expected URL
    -- (store/results.py), not a read of the fleet. One row per agent ever enrolled:
    -- built in moments.
    CREATE INDEX agents_by_url ON agents (url, enrolled_at);
    """,
    # 16: history partitioned by week (issue 14): executions, results, claims and
    # manual_runs, migrated online (server/store/partitions.py says how, and which locks
    # each step takes for how long).
    MIGRATION_16,
]


class Migrator:
    """Brings the schema up to :data:`MIGRATIONS`, one server at a time."""

    log = Logger()

    async def migrate(self, cursor: Cursor) -> None:
        """Apply the migrations not yet applied; refuse a schema newer than this code.

        Runs outside any transaction (each migration is its own): pass a plain cursor.
        """
        # Session-level lock: held across the per-migration transactions below, released
        # by the unlock or, if we die, by the connection closing.
        await cursor.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            await cursor.execute(CREATE_MIGRATIONS_TABLE)
            await cursor.execute("SELECT version FROM schema_migrations")
            applied = {row[0] for row in cursor.fetchall()}
            if applied and max(applied) > len(MIGRATIONS):
                raise RuntimeError(
                    f"the database schema is at version {max(applied)}, newer than this "
                    f"server's {len(MIGRATIONS)}: upgrade the server"
                )
            for version, sql in enumerate(MIGRATIONS, start=1):
                if version in applied:
                    continue
                steps = (sql,) if isinstance(sql, str) else sql
                for step in steps[:-1]:
                    await cursor.execute("BEGIN")
                    try:
                        await cursor.execute(step)
                        await cursor.execute("COMMIT")
                    except BaseException:
                        if not cursor.connection.closed:
                            await cursor.execute("ROLLBACK")
                        raise
                await cursor.execute("BEGIN")
                try:
                    await cursor.execute(steps[-1])
                    await cursor.execute(
                        "INSERT INTO schema_migrations (version) VALUES (%s)", (version,)
                    )
                    await cursor.execute("COMMIT")
                except BaseException:
                    if not cursor.connection.closed:
                        await cursor.execute("ROLLBACK")
                    raise
                self.log.info("applied database migration {version}", version=version)
        finally:
            if not cursor.connection.closed:
                await cursor.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
