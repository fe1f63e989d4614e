-- Alerts: one row per alert, replaced as its deliveries progress. seq gives
-- the order alerts were raised in; deliveries holds, per channel, the
-- status and every attempt.
CREATE TABLE alerts (
    seq INTEGER PRIMARY KEY,
    alert_id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    severity TEXT NOT NULL
        CHECK (severity IN ('LOW', 'MEDIUM', 'HIGH', 'CRITICAL')),
    summary TEXT NOT NULL,
    station_id TEXT,
    pump_id TEXT,
    first_raised TEXT NOT NULL,
    last_raised TEXT NOT NULL,
    repeat_count INTEGER NOT NULL CHECK (repeat_count >= 0),
    details TEXT NOT NULL DEFAULT '{}',
    deliveries TEXT NOT NULL DEFAULT '{}'
);

CREATE INDEX alerts_last_raised ON alerts (last_raised);
CREATE INDEX alerts_kind ON alerts (kind, seq);
CREATE INDEX alerts_severity ON alerts (severity, seq);

-- The permissions that come with alerts, granted to the roles that have
-- them on a new installation: view_alerts to every role but optimizer,
-- manage_alerts to admin.
UPDATE roles
SET permissions = json_insert(permissions, '$[#]', 'view_alerts')
WHERE role IN ('admin', 'operator', 'auditor', 'viewer')
    AND NOT EXISTS (
        SELECT 1 FROM json_each(roles.permissions)
        WHERE json_each.value = 'view_alerts'
    );

UPDATE roles
SET permissions = json_insert(permissions, '$[#]', 'manage_alerts')
WHERE role = 'admin'
    AND NOT EXISTS (
        SELECT 1 FROM json_each(roles.permissions)
        WHERE json_each.value = 'manage_alerts'
    );
