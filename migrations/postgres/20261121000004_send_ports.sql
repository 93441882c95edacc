-- Send ports (issue 5, the send side).
--
-- * outbox.seq: the commit order of sends; an ordered port delivers its rows one at a time by seq.
-- * outbox.status gains 'held' (an ordered port stopped on this row after its retries: nothing
--   after it on the port is delivered until an operator resumes or dead-letters it) and
--   'give_up' (an operator asked, with SQL, that the row be dead-lettered: a running host moves it
--   to dead_letters and tells the instance).
-- * outbox.delivered_via: 'primary' or 'backup', the transport that took the message.
-- * outbox.last_attempt_at: when the last delivery attempt ended.

ALTER TABLE cairn.outbox ADD COLUMN seq BIGSERIAL;
ALTER TABLE cairn.outbox DROP CONSTRAINT outbox_status_check;
ALTER TABLE cairn.outbox ADD CONSTRAINT outbox_status_check
    CHECK (status IN ('pending', 'delivered', 'dead', 'held', 'give_up'));
ALTER TABLE cairn.outbox ADD COLUMN delivered_via TEXT CHECK (delivered_via IN ('primary', 'backup'));
ALTER TABLE cairn.outbox ADD COLUMN last_attempt_at TIMESTAMPTZ;
CREATE INDEX outbox_by_port ON cairn.outbox (port, seq) WHERE status IN ('pending', 'held', 'give_up');
CREATE INDEX dead_letters_by_time ON cairn.dead_letters (dead_at);
