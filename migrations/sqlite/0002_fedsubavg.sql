-- FedSubAvg (SQLite): devices' feature sets (submodels) and the heat of every table row they touch.
-- Heat is kept incrementally: an enrolment adds or removes the device once per row it gains or drops.
CREATE TABLE sparse_devices (
    task_id     TEXT    NOT NULL REFERENCES tasks (id),
    device_id   TEXT    NOT NULL,      -- pseudonymous id chosen by the device
    num_samples BIGINT  NOT NULL,
    features    TEXT    NOT NULL,      -- {"table": [row ids ascending], ...} as JSON
    updated_ms  BIGINT  NOT NULL,
    PRIMARY KEY (task_id, device_id)
);

-- h_m (devices holding row m) and the sum of their samples; rows nobody holds have no entry.
CREATE TABLE sparse_heat (
    task_id    TEXT    NOT NULL REFERENCES tasks (id),
    table_name TEXT    NOT NULL,
    row_id     BIGINT  NOT NULL,
    devices    BIGINT  NOT NULL,
    samples    BIGINT  NOT NULL,
    PRIMARY KEY (task_id, table_name, row_id)
);

-- N (registered devices) and their samples, per task.
CREATE TABLE sparse_population (
    task_id TEXT   PRIMARY KEY REFERENCES tasks (id),
    devices BIGINT NOT NULL,
    samples BIGINT NOT NULL
);
