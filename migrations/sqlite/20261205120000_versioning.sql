-- Versioning of in-flight instances (issue 21).
--
-- * history.reason gains 'upgrade': `cairn upgrade` moves an instance to another version of its
--   orchestration in a persistence point of its own (its detail names both versions). SQLite
--   cannot change a CHECK in place, so the table is rebuilt with its rows (it has no index
--   besides its key since console_indexes_lighter).
-- * hosts.registrations: the definitions a host runs, written at its start, as `name@version`
--   items between commas with a comma at each end (",approval@1,approval@2,"), so that a query
--   can ask `registrations LIKE '%,' || orchestration || '@' || version || ',%'`. NULL for a
--   host that did not say (an older build): taken as running every version.

CREATE TABLE history_rebuilt (
    instance_id TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    reason      TEXT NOT NULL CHECK (reason IN ('send', 'start', 'scope_end', 'compensate', 'suspend', 'dehydrate', 'shutdown', 'complete', 'upgrade')),
    step        TEXT NOT NULL,
    status      TEXT NOT NULL,
    at          TEXT NOT NULL,
    host        TEXT NOT NULL,
    epoch       INTEGER NOT NULL,
    detail      TEXT,
    PRIMARY KEY (instance_id, seq)
);
INSERT INTO history_rebuilt (instance_id, seq, reason, step, status, at, host, epoch, detail)
    SELECT instance_id, seq, reason, step, status, at, host, epoch, detail FROM history;
DROP TABLE history;
ALTER TABLE history_rebuilt RENAME TO history;

ALTER TABLE hosts ADD COLUMN registrations TEXT;
