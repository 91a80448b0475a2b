-- fedhive round state (PostgreSQL). Times are Unix milliseconds. Model and update tensors live in the blob
-- store; these tables say which blobs count.
CREATE TABLE tasks (
    id               TEXT PRIMARY KEY,
    config           TEXT    NOT NULL,  -- TaskConfig as JSON
    state            TEXT    NOT NULL CHECK (state IN ('running', 'finished')),
    model_version    BIGINT  NOT NULL,  -- blob models/<id>/<version>.safetensors
    committed_rounds BIGINT  NOT NULL,
    created_ms       BIGINT  NOT NULL
);

CREATE TABLE rounds (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id       TEXT    NOT NULL REFERENCES tasks (id),
    seq           BIGINT  NOT NULL,     -- 1-based attempt number within the task
    state         TEXT    NOT NULL CHECK (state IN ('open', 'closing', 'committed', 'abandoned')),
    base_version  BIGINT  NOT NULL,
    assigned      BIGINT  NOT NULL DEFAULT 0,
    accepted      BIGINT  NOT NULL DEFAULT 0,
    total_samples BIGINT  NOT NULL DEFAULT 0,
    opened_ms     BIGINT  NOT NULL,
    deadline_ms   BIGINT  NOT NULL,
    closed_ms     BIGINT,
    UNIQUE (task_id, seq)
);
-- At most one round per task takes check-ins and uploads.
CREATE UNIQUE INDEX rounds_one_active ON rounds (task_id) WHERE state IN ('open', 'closing');

CREATE TABLE assignments (
    token_hash TEXT    PRIMARY KEY,     -- SHA-256 of the upload token; the token itself is never stored
    round_id   BIGINT  NOT NULL REFERENCES rounds (id),
    created_ms BIGINT  NOT NULL
);
CREATE INDEX assignments_round ON assignments (round_id);

CREATE TABLE updates (
    token_hash   TEXT    PRIMARY KEY REFERENCES assignments (token_hash),
    round_id     BIGINT  NOT NULL REFERENCES rounds (id),
    num_samples  BIGINT  NOT NULL,
    sha256       TEXT    NOT NULL,      -- of num_samples and body: identifies a retry of the same upload
    blob_key     TEXT    NOT NULL,
    accepted_seq BIGINT  NOT NULL,      -- the round's accepted count right after this update
    created_ms   BIGINT  NOT NULL
);
CREATE INDEX updates_round ON updates (round_id);

CREATE TABLE metrics (
    token_hash  TEXT    PRIMARY KEY REFERENCES assignments (token_hash),
    round_id    BIGINT  NOT NULL REFERENCES rounds (id),
    loss        DOUBLE PRECISION NOT NULL,
    num_samples BIGINT  NOT NULL,
    accuracy    DOUBLE PRECISION,
    created_ms  BIGINT  NOT NULL
);
