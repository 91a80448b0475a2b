-- Operator credentials and the audit log (issue 16). A named token has one scope: `read-only`,
-- `operator`, or `cloud-worker` for one DC-CCL task (`task_id`). Only the SHA-256 of the token is
-- stored; a name stays taken after its token is revoked, so the audit log's names keep meaning one
-- credential. `last_used_ms` is refreshed at most once a minute.
CREATE TABLE operator_tokens (
    name          TEXT    PRIMARY KEY,
    token_hash    TEXT    NOT NULL UNIQUE,
    scope         TEXT    NOT NULL CHECK (scope IN ('read-only', 'operator', 'cloud-worker')),
    task_id       TEXT    REFERENCES tasks (id),
    created_by    TEXT    NOT NULL,
    created_ms    BIGINT  NOT NULL,
    revoked_ms    BIGINT,
    last_used_ms  BIGINT,
    CHECK ((scope = 'cloud-worker') = (task_id IS NOT NULL))
);

-- What operators (and cloud workers) changed: who (a token name, `admin` for the bootstrap token,
-- `insecure-dev` without one, `task-worker:<task>` for a task's own worker token), what (action and
-- target), how it ended (`ok` or the refusal's error code) and when. Never a token or its hash.
CREATE TABLE audit_log (
    id      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at_ms   BIGINT  NOT NULL,
    actor   TEXT    NOT NULL,
    action  TEXT    NOT NULL,
    target  TEXT    NOT NULL,
    outcome TEXT    NOT NULL
);
