-- The claim's first part looks for messages of instances the host holds. Such an instance has
-- started, so its start message is gone: that part reads only routed messages that are not
-- starts, which this index keeps apart from the (often many) start messages waiting for a host.
CREATE INDEX IF NOT EXISTS messages_routed_after_start ON cairn.messages (seq)
    WHERE status = 'routed' AND kind <> 'start';
