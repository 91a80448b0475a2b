-- Device identity for every task (issue 16). Operators create enrolment keys (one per app release,
-- say); a device enrols with a key and gets a credential `device_id:secret` valid for every task.
-- Keys and secrets are stored only as SHA-256. Revoking a key (or a device) sets `revoked_ms`: every
-- request reads it, so a revocation holds from the next request on. Numbered 0008 on purpose (0007
-- belongs to another branch); sqlx applies any version not yet applied, so the gap is harmless.
CREATE TABLE enrolment_keys (
    key_id     TEXT    PRIMARY KEY,     -- public part of the key (`<key_id>:<secret>`)
    name       TEXT    NOT NULL,        -- the operator's label, e.g. the app release
    key_hash   TEXT    NOT NULL,        -- SHA-256 of the secret part; the secret is never stored
    created_ms BIGINT  NOT NULL,
    revoked_ms BIGINT
);

-- Every device credential. `key_id` NULL: enrolled through FedLaAvg's per-task route
-- (`POST /v1/tasks/{id}/devices`), which needs no key and admits the device to that task only.
CREATE TABLE devices (
    device_id   TEXT    PRIMARY KEY,
    key_id      TEXT    REFERENCES enrolment_keys (key_id),
    secret_hash TEXT    NOT NULL,       -- SHA-256 of the device secret
    enrolled_ms BIGINT  NOT NULL,
    revoked_ms  BIGINT
);
CREATE INDEX devices_key ON devices (key_id);

-- FedLaAvg's per-task device rows become the task's population, each mapped to its credential in
-- `devices`: the devices enrolled per task so far keep their id (it is their credential's id too).
INSERT INTO devices (device_id, key_id, secret_hash, enrolled_ms, revoked_ms)
    SELECT device_id, NULL, secret_hash, enrolled_ms, NULL FROM fedlaavg_devices;
ALTER TABLE fedlaavg_devices ADD COLUMN device TEXT REFERENCES devices (device_id);
UPDATE fedlaavg_devices SET device = device_id;
ALTER TABLE fedlaavg_devices DROP COLUMN secret_hash;
CREATE UNIQUE INDEX fedlaavg_devices_member ON fedlaavg_devices (task_id, device);

-- The device an upload token was issued to (NULL: an anonymous check-in): one token per device and
-- round, and a task that requires enrolled devices takes the upload only from that device.
ALTER TABLE assignments ADD COLUMN device_id TEXT REFERENCES devices (device_id);
CREATE UNIQUE INDEX assignments_device_round ON assignments (round_id, device_id) WHERE device_id IS NOT NULL;
