-- One claimer at a time per concurrency key, across nodes, until its transaction ends.
SELECT pg_try_advisory_xact_lock(hashtext('agentry.concurrency_key'), hashtext($1))
