-- Anonymous user embeddings (issue 15): labelled samples that arrive with no credential, mixed into
-- shuffled batches for the task's cloud worker, whose model each round commits.

-- Per task: the number of batches so far. Every submission updates this row first, so submissions
-- to one task serialise on it and batch numbers have no gaps.
CREATE TABLE anon_state (
    task_id     TEXT    PRIMARY KEY,
    batches     BIGINT  NOT NULL
);
-- Samples not yet in a batch, one row each: a random id, the task, and the sample's bytes (input,
-- embedding, label as f32 LE). Nothing else: no device, token, address or time. WITHOUT ROWID, so
-- rows are stored in the order of their random ids, not of their arrival.
CREATE TABLE anon_pending (
    id          TEXT    PRIMARY KEY,
    task_id     TEXT    NOT NULL,
    sample      BLOB    NOT NULL
) WITHOUT ROWID;
CREATE INDEX anon_pending_task ON anon_pending (task_id);
-- SHA-256 of each submission's Idempotency-Key, so a retry stores nothing twice. No link to the
-- samples it brought and no time; WITHOUT ROWID, so not even the order of arrival.
CREATE TABLE anon_seen_keys (
    task_id     TEXT    NOT NULL,
    key_hash    TEXT    NOT NULL,
    PRIMARY KEY (task_id, key_hash)
) WITHOUT ROWID;
-- Shuffled batches of a task's samples (blobs), numbered 1, 2, ... without gaps.
CREATE TABLE anon_batches (
    task_id     TEXT    NOT NULL,
    number      BIGINT  NOT NULL,
    blob_key    TEXT    NOT NULL,
    samples     BIGINT  NOT NULL,
    PRIMARY KEY (task_id, number)
);
-- The worker's model for a round, once per round; accepted only while the round is open.
CREATE TABLE anon_round_models (
    round_id    BIGINT  PRIMARY KEY REFERENCES rounds (id),
    sha256      TEXT    NOT NULL,
    blob_key    TEXT    NOT NULL,
    created_ms  BIGINT  NOT NULL
);
