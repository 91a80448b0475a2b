-- Several server replicas on one database (issue 18): the database is the arbiter, nothing that
-- matters lives in one process.

-- The replica that accepted (and folded) each update, so a finaliser knows whose partial sums
-- cover it; NULL for updates accepted before this migration.
ALTER TABLE updates ADD COLUMN replica TEXT;

-- The replica finalising a closing round, and until when its lease holds (Unix ms): exactly one
-- finalises at a time, and another takes over once a dead one's lease runs out.
ALTER TABLE rounds ADD COLUMN finaliser TEXT;
ALTER TABLE rounds ADD COLUMN finaliser_until BIGINT;

-- Each running replica (one process: its name and a random incarnation) and when it last said so.
CREATE TABLE replicas (
    id      TEXT    PRIMARY KEY,
    name    TEXT    NOT NULL,
    seen_ms BIGINT  NOT NULL
);

-- The fixed-point sums a replica folded for a closing round, handed to its finaliser: the blob
-- (FedAvgAccumulator::to_bytes) and the token hashes folded into it (a JSON array).
CREATE TABLE round_partials (
    round_id   BIGINT  NOT NULL REFERENCES rounds (id),
    replica    TEXT    NOT NULL,
    blob_key   TEXT    NOT NULL,
    tokens     TEXT    NOT NULL,
    created_ms BIGINT  NOT NULL,
    PRIMARY KEY (round_id, replica)
);
