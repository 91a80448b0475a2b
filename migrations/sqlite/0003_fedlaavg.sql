-- FedLaAvg (issue 4): enrolled devices, per-round availability and least-recently-participated
-- selection. A device's last participation R_i and its latest gradient sum G_i are not stored as
-- columns: both derive from its accepted update in the latest *committed* round (join
-- fedlaavg_assignments -> updates -> rounds), so the transaction that commits a round switches every
-- pointer at once. G_i lives in the blob store at fedlaavg/<task>/grads/<device>/<round seq>, and
-- T = sum_i G_i at fedlaavg/<task>/sums/<model version>.
CREATE TABLE fedlaavg_devices (
    device_id   TEXT    PRIMARY KEY,   -- pseudonymous, issued at enrolment
    task_id     TEXT    NOT NULL REFERENCES tasks (id),
    secret_hash TEXT    NOT NULL,      -- SHA-256 of the device secret; the secret is never stored
    enrolled_ms BIGINT  NOT NULL
);
CREATE INDEX fedlaavg_devices_task ON fedlaavg_devices (task_id);

-- Devices that checked in (were available) for a round; `selected` = 1 for the round's picks.
CREATE TABLE fedlaavg_checkins (
    round_id      BIGINT NOT NULL REFERENCES rounds (id),
    device_id     TEXT   NOT NULL REFERENCES fedlaavg_devices (device_id),
    checked_in_ms BIGINT NOT NULL,
    selected      BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (round_id, device_id)
);

-- One row per round once its selection is made; N (the population S = T/N divides by) is frozen
-- here so that re-running the round's finalisation after a crash gives the same model.
CREATE TABLE fedlaavg_selections (
    round_id    BIGINT PRIMARY KEY REFERENCES rounds (id),
    population  BIGINT NOT NULL,
    selected    BIGINT NOT NULL,
    selected_ms BIGINT NOT NULL
);

-- Which device an upload token was issued to: one token per (round, device), so an update is
-- applied at most once per device and round.
CREATE TABLE fedlaavg_assignments (
    token_hash TEXT   PRIMARY KEY REFERENCES assignments (token_hash),
    round_id   BIGINT NOT NULL REFERENCES rounds (id),
    device_id  TEXT   NOT NULL REFERENCES fedlaavg_devices (device_id),
    UNIQUE (round_id, device_id)
);
CREATE INDEX fedlaavg_assignments_device ON fedlaavg_assignments (device_id);
