-- Operator control of a task (issue 17): `paused` (no assignments, the ticker leaves its rounds
-- alone until it is resumed) or `cancelled` (finished early; its open round abandoned). NULL: neither.
-- A column of its own rather than new `state` values, because SQLite cannot alter a CHECK constraint
-- without rebuilding the table that every round references.
ALTER TABLE tasks ADD COLUMN halt TEXT CHECK (halt IN ('paused', 'cancelled'));
