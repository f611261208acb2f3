-- A stream's partition key, fixed at its first append (by default its aggregate id). Events
-- appended before this migration have none stored; readers take their aggregate id.
ALTER TABLE {prefix}events ADD COLUMN IF NOT EXISTS partition_key TEXT;
