-- One claimer at a time, across nodes, while cluster-wide caps are set: it counts the runs
-- leased and claims within the caps before the next one counts (until its transaction ends).
SELECT pg_advisory_xact_lock(hashtext('agentry.cluster_caps'), hashtext(current_schema()))
