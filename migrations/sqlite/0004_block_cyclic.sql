-- MM-PSGD / MC-PSGD (issue 5): one row per committed round of a block-cyclic task. The schedule
-- position, the per-block predictor p_m (count r_m and its blob) and MC-PSGD's chain y_m are all read
-- from the latest committed row (of the task, or of the block), so a restart resumes exactly there.
-- A row is written, before its round's commit transaction, from values that are a deterministic
-- function of the round's frozen accepted set; readers join `rounds` and count it only once the round
-- is committed. The blobs it names are immutable (keyed by round id).
CREATE TABLE block_rounds (
    round_id        BIGINT  PRIMARY KEY REFERENCES rounds (id),
    task_id         TEXT    NOT NULL REFERENCES tasks (id),
    cycle           BIGINT  NOT NULL,
    block_index     BIGINT  NOT NULL,
    block_name      TEXT    NOT NULL,
    round_in_block  BIGINT  NOT NULL,  -- 1-based
    block_rounds    BIGINT  NOT NULL,  -- r_m after this round
    chosen          TEXT    NOT NULL CHECK (chosen IN ('x', 'chain')),
    mean_loss_x     DOUBLE PRECISION,  -- MC-PSGD: sample-weighted mean reported losses
    mean_loss_chain DOUBLE PRECISION,
    predictor_key   TEXT    NOT NULL,  -- blob of p_m after this round
    chain_key       TEXT,              -- MC-PSGD: blob of y_m after this round
    created_ms      BIGINT  NOT NULL
);
CREATE INDEX block_rounds_task ON block_rounds (task_id, block_index, round_id);
