-- Entitlement grants, the policy version, and the trigger that bumps and announces it on every change.
CREATE TABLE IF NOT EXISTS entitlement_grants (
    id          bigserial PRIMARY KEY,
    tenant_id   text NOT NULL CHECK (tenant_id <> ''),
    subject     text NOT NULL,
    action      text NOT NULL CHECK (action IN ('read', 'write', 'subscribe', 'admin', '*')),
    resource    text NOT NULL CHECK (resource <> ''),
    effect      text NOT NULL CHECK (effect IN ('allow', 'deny')),
    expires_at  timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS entitlement_grants_tenant_subject ON entitlement_grants (tenant_id, subject);

CREATE TABLE IF NOT EXISTS entitlement_policy_version (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version    bigint NOT NULL
);
INSERT INTO entitlement_policy_version (singleton, version) VALUES (true, 1) ON CONFLICT DO NOTHING;

-- One bump per statement; the payload names the schema so that several schemas can share a database.
CREATE OR REPLACE FUNCTION entitlement_bump_policy_version() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v bigint;
BEGIN
    UPDATE entitlement_policy_version SET version = version + 1 WHERE singleton RETURNING version INTO v;
    PERFORM pg_notify('accessd_entitlements', current_schema() || ':' || v::text);
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS entitlement_grants_changed ON entitlement_grants;
CREATE TRIGGER entitlement_grants_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON entitlement_grants
    FOR EACH STATEMENT EXECUTE FUNCTION entitlement_bump_policy_version();
