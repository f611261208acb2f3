-- The coordination protocol each worker speaks, so that a worker of a newer release meeting live
-- workers of an older one refuses to take part instead of mixing protocols. Rows written by releases
-- before this column existed speak protocol 1.
ALTER TABLE {prefix}workers ADD COLUMN protocol INTEGER NOT NULL DEFAULT 1;
