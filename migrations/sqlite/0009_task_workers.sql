-- The cloud worker's token is no longer DC-CCL's alone (anonymous embeddings, issue 15, has one
-- too): its table is named for every task kind with a worker.
ALTER TABLE dc_ccl_workers RENAME TO task_workers;
