-- The audit log: append-only, each row chained to the one before by SHA-256.
-- Rows are numbered by the adapter without gaps (the chain head below
-- serialises appends), so the sequence behind id is not used.
CREATE TABLE compliance_audit_log (
    id bigserial PRIMARY KEY,
    uid text NOT NULL UNIQUE,
    "timestamp" timestamptz NOT NULL,
    severity text NOT NULL
        CHECK (severity IN ('LOW', 'MEDIUM', 'HIGH', 'CRITICAL')),
    event_type text NOT NULL,
    user_name text,
    source_address text,
    protocol text,
    station_id text,
    pump_id text,
    old_value text,
    new_value text,
    outcome text,
    details jsonb NOT NULL DEFAULT '{}'::jsonb,
    prev_hash text NOT NULL CHECK (length(prev_hash) = 64),
    hash text NOT NULL CHECK (length(hash) = 64)
);

CREATE INDEX compliance_audit_log_timestamp
    ON compliance_audit_log ("timestamp", id);
CREATE INDEX compliance_audit_log_event_type
    ON compliance_audit_log (event_type, id);
CREATE INDEX compliance_audit_log_severity
    ON compliance_audit_log (severity, id);
CREATE INDEX compliance_audit_log_station_id
    ON compliance_audit_log (station_id, id);
CREATE INDEX compliance_audit_log_user_name
    ON compliance_audit_log (user_name, id);

CREATE FUNCTION calejo_audit_log_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'compliance_audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER compliance_audit_log_append_only
    BEFORE UPDATE OR DELETE ON compliance_audit_log
    FOR EACH ROW EXECUTE FUNCTION calejo_audit_log_refuse_change();

CREATE TRIGGER compliance_audit_log_no_truncate
    BEFORE TRUNCATE ON compliance_audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION calejo_audit_log_refuse_change();

-- The last row of the chain. Appends lock it (SELECT ... FOR UPDATE), so
-- adapters sharing the database append one after the other; verification
-- finds rows removed from the end of the log.
CREATE TABLE audit_chain_head (
    id integer PRIMARY KEY CHECK (id = 1),
    last_id bigint NOT NULL,
    last_hash text NOT NULL
);

INSERT INTO audit_chain_head (id, last_id, last_hash)
VALUES (1, 0, repeat('0', 64));

-- Live state: the latest of each, replaced.
CREATE TABLE setpoints (
    station_id text NOT NULL,
    pump_id text NOT NULL,
    requested double precision,
    target double precision NOT NULL,
    applied double precision NOT NULL,
    outcome text NOT NULL,
    source text NOT NULL,
    user_name text,
    at timestamptz NOT NULL,
    PRIMARY KEY (station_id, pump_id)
);

CREATE TABLE plans (
    plan_id text PRIMARY KEY,
    version bigint NOT NULL,
    received_at timestamptz NOT NULL,
    body jsonb NOT NULL,
    user_name text
);

-- scope: '' for the system, the station id, or 'station_id/pump_id'.
CREATE TABLE emergency_stops (
    level text NOT NULL CHECK (level IN ('system', 'station', 'pump')),
    scope text NOT NULL,
    station_id text,
    pump_id text,
    active boolean NOT NULL,
    reason text NOT NULL,
    operator text NOT NULL,
    at timestamptz NOT NULL,
    since timestamptz,
    PRIMARY KEY (level, scope)
);

CREATE TABLE station_states (
    station_id text PRIMARY KEY,
    last_fresh_at timestamptz,
    failsafe boolean NOT NULL
);

CREATE TABLE stations (
    station_id text PRIMARY KEY,
    definition jsonb NOT NULL
);

CREATE TABLE users (
    user_id text PRIMARY KEY,
    username text NOT NULL,
    email text NOT NULL,
    role text NOT NULL,
    password_hash text NOT NULL,
    active boolean NOT NULL,
    must_change_password boolean NOT NULL,
    failed_logins integer NOT NULL,
    locked_until timestamptz,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);

CREATE INDEX users_username ON users (username);

CREATE TABLE roles (
    role text PRIMARY KEY,
    permissions text[] NOT NULL
);

CREATE TABLE tokens (
    token_hash text PRIMARY KEY,
    user_id text NOT NULL,
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    revoked boolean NOT NULL
);

CREATE INDEX tokens_expires_at ON tokens (expires_at);
