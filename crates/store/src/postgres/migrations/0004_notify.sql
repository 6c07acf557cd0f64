-- Tell the other nodes at once (NOTIFY, delivered when the writing transaction commits) what
-- they would otherwise see only at their next poll: a run to claim, new events for their
-- followers, a cancel for a run they execute. The payload starts with the schema, so that
-- several deployments can share one database. PostgreSQL-only: SQLite has one node.

CREATE FUNCTION agentry_notify_runs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'queued' THEN
        PERFORM pg_notify('agentry_runs', current_schema() || ' ' || NEW.agent);
    END IF;
    IF NEW.cancel_requested AND NEW.status = 'running'
       AND (TG_OP = 'INSERT' OR NOT OLD.cancel_requested) THEN
        PERFORM pg_notify('agentry_cancels', current_schema() || ' ' || NEW.id);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER agentry_runs_notify
    AFTER INSERT OR UPDATE OF status, run_at, cancel_requested ON runs
    FOR EACH ROW EXECUTE FUNCTION agentry_notify_runs();

CREATE FUNCTION agentry_notify_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('agentry_events', current_schema() || ' ' || NEW.run_id || ' ' || NEW.seq);
    RETURN NULL;
END $$;

CREATE TRIGGER agentry_events_notify
    AFTER INSERT ON run_events
    FOR EACH ROW EXECUTE FUNCTION agentry_notify_events();
