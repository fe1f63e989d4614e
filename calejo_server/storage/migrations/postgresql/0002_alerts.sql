-- Alerts: one row per alert, replaced as its deliveries progress. seq gives
-- the order alerts were raised in; deliveries holds, per channel, the
-- status and every attempt.
CREATE TABLE alerts (
    seq bigserial PRIMARY KEY,
    alert_id text NOT NULL UNIQUE,
    kind text NOT NULL,
    severity text NOT NULL
        CHECK (severity IN ('LOW', 'MEDIUM', 'HIGH', 'CRITICAL')),
    summary text NOT NULL,
    station_id text,
    pump_id text,
    first_raised timestamptz NOT NULL,
    last_raised timestamptz NOT NULL,
    repeat_count integer NOT NULL CHECK (repeat_count >= 0),
    details jsonb NOT NULL DEFAULT '{}'::jsonb,
    deliveries jsonb NOT NULL DEFAULT '{}'::jsonb
);

CREATE INDEX alerts_last_raised ON alerts (last_raised);
CREATE INDEX alerts_kind ON alerts (kind, seq);
CREATE INDEX alerts_severity ON alerts (severity, seq);

-- The permissions that come with alerts, granted to the roles that have
-- them on a new installation: view_alerts to every role but optimizer,
-- manage_alerts to admin.
UPDATE roles
SET permissions = array_append(permissions, 'view_alerts')
WHERE role IN ('admin', 'operator', 'auditor', 'viewer')
    AND NOT ('view_alerts' = ANY (permissions));

UPDATE roles
SET permissions = array_append(permissions, 'manage_alerts')
WHERE role = 'admin'
    AND NOT ('manage_alerts' = ANY (permissions));
