-- DC-CCL device-cloud fusion (issue 14). The task's cloud worker holds a token of its own, issued at
-- task creation and stored hashed; it publishes control models F_m (immutable versions 1, 2, ...)
-- and submits one contribution (its copy of F_s, as a delta) per round. A contribution is accepted
-- only while its round is open (the insert holds the round's row), so closing a round freezes it
-- with the devices' updates; the primary key makes it exactly once per round.
CREATE TABLE dc_ccl_workers (
    task_id     TEXT    PRIMARY KEY,
    token_hash  TEXT    NOT NULL
);
CREATE TABLE dc_ccl_control_models (
    task_id     TEXT    NOT NULL REFERENCES tasks (id),
    version     BIGINT  NOT NULL,
    sha256      TEXT    NOT NULL,
    blob_key    TEXT    NOT NULL,
    created_ms  BIGINT  NOT NULL,
    PRIMARY KEY (task_id, version)
);
CREATE TABLE dc_ccl_cloud_updates (
    round_id    BIGINT  PRIMARY KEY REFERENCES rounds (id),
    sha256      TEXT    NOT NULL,
    blob_key    TEXT    NOT NULL,
    created_ms  BIGINT  NOT NULL
);
