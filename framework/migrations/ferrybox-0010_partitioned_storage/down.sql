-- Turning partitioned tables back into plain ones would copy every row (and the log relay
-- would stream the copies as new messages): this migration is not reverted.
DO $$
BEGIN
    RAISE EXCEPTION 'ferrybox-0010_partitioned_storage cannot be reverted';
END
$$;
