-- The audit log: append-only, each row chained to the one before by SHA-256.
CREATE TABLE compliance_audit_log (
    id INTEGER PRIMARY KEY,
    uid TEXT NOT NULL UNIQUE,
    timestamp TEXT NOT NULL,
    severity TEXT NOT NULL
        CHECK (severity IN ('LOW', 'MEDIUM', 'HIGH', 'CRITICAL')),
    event_type TEXT NOT NULL,
    user_name TEXT,
    source_address TEXT,
    protocol TEXT,
    station_id TEXT,
    pump_id TEXT,
    old_value TEXT,
    new_value TEXT,
    outcome TEXT,
    details TEXT NOT NULL DEFAULT '{}',
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);

CREATE INDEX compliance_audit_log_timestamp ON compliance_audit_log (timestamp);
CREATE INDEX compliance_audit_log_event_type ON compliance_audit_log (event_type);
CREATE INDEX compliance_audit_log_severity ON compliance_audit_log (severity);
CREATE INDEX compliance_audit_log_station_id ON compliance_audit_log (station_id);
CREATE INDEX compliance_audit_log_user_name ON compliance_audit_log (user_name);

CREATE TRIGGER compliance_audit_log_no_update
BEFORE UPDATE ON compliance_audit_log
BEGIN
    SELECT RAISE(ABORT, 'compliance_audit_log is append-only: UPDATE refused');
END;

CREATE TRIGGER compliance_audit_log_no_delete
BEFORE DELETE ON compliance_audit_log
BEGIN
    SELECT RAISE(ABORT, 'compliance_audit_log is append-only: DELETE refused');
END;

-- The last row of the chain, updated with each append: appends read and
-- lock it, and verification finds rows removed from the end of the log.
CREATE TABLE audit_chain_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last_id INTEGER NOT NULL,
    last_hash TEXT NOT NULL
);

INSERT INTO audit_chain_head (id, last_id, last_hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

-- Live state: the latest of each, replaced.
CREATE TABLE setpoints (
    station_id TEXT NOT NULL,
    pump_id TEXT NOT NULL,
    requested REAL,
    target REAL NOT NULL,
    applied REAL NOT NULL,
    outcome TEXT NOT NULL,
    source TEXT NOT NULL,
    user_name TEXT,
    at TEXT NOT NULL,
    PRIMARY KEY (station_id, pump_id)
) WITHOUT ROWID;

CREATE TABLE plans (
    plan_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    received_at TEXT NOT NULL,
    body TEXT NOT NULL,
    user_name TEXT
);

-- scope: '' for the system, the station id, or 'station_id/pump_id'.
CREATE TABLE emergency_stops (
    level TEXT NOT NULL CHECK (level IN ('system', 'station', 'pump')),
    scope TEXT NOT NULL,
    station_id TEXT,
    pump_id TEXT,
    active INTEGER NOT NULL,
    reason TEXT NOT NULL,
    operator TEXT NOT NULL,
    at TEXT NOT NULL,
    since TEXT,
    PRIMARY KEY (level, scope)
);

CREATE TABLE station_states (
    station_id TEXT PRIMARY KEY,
    last_fresh_at TEXT,
    failsafe INTEGER NOT NULL
);

CREATE TABLE stations (
    station_id TEXT PRIMARY KEY,
    definition TEXT NOT NULL
);

CREATE TABLE users (
    user_id TEXT PRIMARY KEY,
    username TEXT NOT NULL,
    email TEXT NOT NULL,
    role TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    active INTEGER NOT NULL,
    must_change_password INTEGER NOT NULL,
    failed_logins INTEGER NOT NULL,
    locked_until TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

CREATE INDEX users_username ON users (username);

CREATE TABLE roles (
    role TEXT PRIMARY KEY,
    permissions TEXT NOT NULL
);

CREATE TABLE tokens (
    token_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    revoked INTEGER NOT NULL
);

CREATE INDEX tokens_expires_at ON tokens (expires_at);
