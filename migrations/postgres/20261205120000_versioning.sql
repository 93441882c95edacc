-- Versioning of in-flight instances (issue 21); the same changes as migrations/sqlite.
--
-- * history.reason gains 'upgrade': `cairn upgrade` moves an instance to another version of its
--   orchestration in a persistence point of its own (its detail names both versions).
-- * hosts.registrations: the definitions a host runs, written at its start, as `name@version`
--   items between commas with a comma at each end (",approval@1,approval@2,"). NULL for a host
--   that did not say (an older build): taken as running every version.

ALTER TABLE cairn.history DROP CONSTRAINT history_reason_check;
ALTER TABLE cairn.history ADD CONSTRAINT history_reason_check
    CHECK (reason IN ('send', 'start', 'scope_end', 'compensate', 'suspend', 'dehydrate', 'shutdown', 'complete', 'upgrade'));

ALTER TABLE cairn.hosts ADD COLUMN registrations TEXT;
